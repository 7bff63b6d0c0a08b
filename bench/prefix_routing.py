"""Cache-aware routing against load-only routing, through the real router, on the same workload in one run.

    .venv/bin/python bench/prefix_routing.py [--workers 2,4] [--quick] [--json out.json]

For each worker count N: N worker replicas of a model sized so that prefill costs real time on this CPU (4 layers,
hidden 256: a 1,200-token prompt takes a few hundred ms to prefill, its last 40 tokens a few ms), each with a KV
cache that holds about a third of the shared prefixes, a redis-server, and a router started with `--routing load`,
`--routing cache`, then two `--routing cache` routers side by side (the requests alternate between them). Every
configuration starts on fresh workers (cold caches) and gets the same seeded requests at the same seeded Poisson
arrival times:

- shared: 4N shared prefixes ("system prompts", "documents") of about 1,200 tokens, each request one of them (at
  random) plus a short unique question;
- skewed: the same, with one prefix 80% of the requests.

The arrival rate is what the load-only router sustains (calibrated at the start: a closed loop of 2N streams on
load-only routing, times --load), unless --rate is given. Printed per configuration, of that open-loop run: TTFT
p50/p90/p99, the cache hit rate (cached / prompt tokens, from each reply's usage), each worker's share of the
prefill tokens computed (prompt - cached, from the routers' request_finished lines) and the busiest one's against
the mean; and output tokens/s of 4N back-to-back streams on the same requests right after it (the cluster's
capacity under that routing). Then the ratios the acceptance is judged on (issue 16).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from bench.router_overhead import PEPPER, create_key, write_tiers  # noqa: E402
from bench.router_processes import _wait_port  # noqa: E402
from bench.workload import percentile  # noqa: E402
from protos.llamagrid.v1 import inference_pb2 as pb  # noqa: E402
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

MODEL = dict(seed=0, num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=4, intermediate_size=688)
PREFIX_WORDS = 520  # about 1,200 tokens of the tiny tokenizer
SUFFIX_WORDS = (8, 20)
MAX_NEW_TOKENS = 16
KV_TOKENS = 6144  # per worker: about 4 prefixes, with the running requests' blocks
MODES = ("load", "cache", "cache x2")
KILL_AT_S = 15.0
KILL_RUN_S = 60.0
WORKER_ARGS = ("--num-threads", "1", "--kv-cache-tokens", str(KV_TOKENS), "--max-num-seqs", "16",
               "--max-num-batched-tokens", "2048")


# ---- workload (pure)


@dataclass(frozen=True)
class Request:
    at_s: float  # arrival, from the start
    prefix: int
    text: str


def words(rng: random.Random, corpus: list[str], n: int) -> str:
    return " ".join(rng.choice(corpus) for _ in range(n))


def make_workload(num_prefixes: int, num_requests: int, rate: float, seed: int, hot_share: float | None,
                  corpus: list[str]) -> list[Request]:
    """Seeded requests: each a shared prefix (uniform, or prefix 0 with probability `hot_share`) and a unique
    question, arriving as a Poisson process of `rate` per second."""
    rng = random.Random(seed)
    prefixes = [f"Document {i}. " + words(rng, corpus, PREFIX_WORDS) for i in range(num_prefixes)]
    out, t = [], 0.0
    for n in range(num_requests):
        t += rng.expovariate(rate)
        if hot_share is not None and rng.random() < hot_share:
            p = 0
        else:
            p = rng.randrange(num_prefixes) if hot_share is None else rng.randrange(1, num_prefixes)
        out.append(Request(t, p, f"{prefixes[p]}\nQuestion {n}: {words(rng, corpus, rng.randint(*SUFFIX_WORDS))}?"))
    return out


def summarise(results: list[dict], wall_s: float, finished: list[dict]) -> dict:
    """Figures of one configuration: `results` from the client, `finished` the routers' request_finished lines."""
    ttft = [r["ttft_ms"] for r in results if r["ok"]]
    prompt = sum(r["prompt_tokens"] for r in results if r["ok"])
    cached = sum(r["cached_tokens"] for r in results if r["ok"])
    prefill: dict[str, int] = defaultdict(int)
    for line in finished:
        if line.get("method") != "GenerateStream" or not line.get("worker"):
            continue
        prefill[line["worker"]] += (line.get("prompt_tokens") or 0) - (line.get("cached_prompt_tokens") or 0)
    total = sum(prefill.values())
    shares = {w: n / total for w, n in sorted(prefill.items())} if total else {}
    return {"requests": len(results), "errors": sum(not r["ok"] for r in results),
            "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p90": percentile(ttft, 90),
            "ttft_ms_p99": percentile(ttft, 99),
            "open_output_tok_s": sum(r["completion_tokens"] for r in results if r["ok"]) / wall_s if wall_s else 0.0,
            "hit_rate": cached / prompt if prompt else 0.0, "prefill_shares": shares,
            "busiest_vs_mean": max(shares.values()) * len(shares) if shares else float("nan")}


def verdict(figures: dict) -> list[tuple[str, bool, str]]:
    """Issue 16's acceptance on one worker count's figures ({workload: {mode: summary}})."""
    out = []
    shared, skewed = figures.get("shared"), figures.get("skewed")
    if shared:
        load, cache = shared["load"], shared["cache"]
        for name, key, target, better in (("TTFT p90", "ttft_ms_p90", 0.5, "<="),
                                          ("output tokens/s", "output_tok_s", 1.3, ">="),
                                          ("cache hit rate", "hit_rate", 2.0, ">=")):
            ratio = cache[key] / load[key] if load[key] else float("inf")
            ok = ratio <= target if better == "<=" else ratio >= target
            out.append((f"shared: {name} cache/load", ok, f"{cache[key]:.3g} / {load[key]:.3g} = {ratio:.2f}x "
                                                          f"(target {better} {target}x)"))
        if "cache x2" in shared:
            ratio = shared["cache x2"]["hit_rate"] / cache["hit_rate"] if cache["hit_rate"] else 0.0
            out.append(("shared: hit rate, two routers / one", ratio >= 0.9, f"{ratio:.2f}x (target >= 0.9x)"))
    if skewed:
        cache, load = skewed["cache"], skewed["load"]
        out.append(("skewed: busiest worker's prefill share / mean", cache["busiest_vs_mean"] <= 1.5,
                    f"{cache['busiest_vs_mean']:.2f}x (target <= 1.5x; load-only {load['busiest_vs_mean']:.2f}x)"))
        ratio = cache["ttft_ms_p90"] / load["ttft_ms_p90"]
        out.append(("skewed: TTFT p90 cache/load", ratio <= 1.0, f"{cache['ttft_ms_p90']:.0f} / "
                                                                 f"{load['ttft_ms_p90']:.0f} ms = {ratio:.2f}x "
                                                                 "(target <= 1.0x)"))
    kill = figures.get("kill")
    if kill:
        cleared, phases = kill["view_cleared_after_s"], kill["hit_rate_phases"]
        out.append(("kill: no request lost", kill["errors"] == 0, f"{kill['errors']} failed"))
        out.append(("kill: the killed worker's view dropped within 1 s", cleared is not None and cleared <= 1.0,
                    "never" if cleared is None else f"{cleared:.2f} s"))
        out.append(("kill: hit rate recovers (after the restart >= 0.8x before the kill)", phases[2] >= 0.8 * phases[0],
                    " ".join(f"{h:.2f}" for h in phases)))
    for name in ("shared", "skewed"):
        if name in figures:
            errors = sum(s["errors"] for s in figures[name].values())
            out.append((f"{name}: errors", errors == 0, f"{errors}"))
    return out


# ---- cluster


@dataclass
class Cluster:
    model_dir: Path
    tmp: Path
    num_workers: int
    redis: object = None
    key: str = ""
    tiers: Path | None = None
    workers: list = field(default_factory=list)
    routers: list[subprocess.Popen] = field(default_factory=list)
    router_ports: list[int] = field(default_factory=list)
    router_logs: list[Path] = field(default_factory=list)
    router_args: tuple[str, ...] = ()

    def start_redis(self) -> None:
        from ratelimit.redis_server import RedisServer

        self.redis = RedisServer().start()
        self.tiers = write_tiers(self.tmp / "tiers.toml")
        self.key = asyncio.run(create_key(self.redis.url))

    def start(self, mode: str, tag: str, supervised: bool = False) -> None:
        """Fresh workers (cold caches) and the mode's router(s). `supervised`: each worker under its supervisor,
        which restarts it on the same port when it dies."""
        from concurrent.futures import ThreadPoolExecutor

        from worker.launch import start_worker

        def one(i: int):
            with open(self.tmp / f"{tag}-worker{i}.log", "w") as log:
                if supervised:
                    return Supervised.start(self.model_dir, self.tmp / f"{tag}-worker{i}", WORKER_ARGS, log)
                return start_worker(self.model_dir, *WORKER_ARGS, stderr=log)

        with ThreadPoolExecutor(self.num_workers) as ex:
            self.workers = list(ex.map(one, range(self.num_workers)))
        routing = mode.split()[0]
        count = 2 if mode.endswith("x2") else 1
        env = {**os.environ, "LLAMAGRID_KEY_PEPPER": PEPPER}
        self.routers, self.router_ports, self.router_logs = [], [], []
        for r in range(count):
            port_file, log_path = self.tmp / f"{tag}-router{r}.port", self.tmp / f"{tag}-router{r}.log"
            with open(log_path, "w") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "router", "--workers", ",".join(w.address for w in self.workers),
                     "--port", "0", "--port-file", str(port_file), "--redis-url", self.redis.url, "--tiers",
                     str(self.tiers), "--routing", routing, "--log-level", "info", *self.router_args],
                    cwd=ROOT, env=env, stdout=log, stderr=log)
            self.routers.append(proc)
            self.router_ports.append(_wait_port(proc, port_file, log_path))
            self.router_logs.append(log_path)

    def wait_cache_views(self, timeout_s: float = 30.0) -> None:
        """Until every router has every worker's cache snapshot (its worker_cache_view_live lines): before that, a
        request would be placed by load alone."""
        addresses = {w.address for w in self.workers}
        deadline = time.monotonic() + timeout_s
        while True:
            live = [{e.get("address") for e in _events(path) if e.get("event") == "worker_cache_view_live"}
                    for path in self.router_logs]
            if all(addresses <= seen for seen in live):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the routers did not see every worker's cache within {timeout_s} s")
            time.sleep(0.05)

    def finished_lines(self) -> list[dict]:
        return [e for path in self.router_logs for e in _events(path) if e.get("event") == "request_finished"]

    def stop_mode(self) -> None:
        from worker.launch import stop_process

        for proc in self.routers:
            stop_process(proc, 15)
        for w in self.workers:
            w.stop(timeout=15)
        self.routers, self.workers = [], []

    def stop(self) -> None:
        self.stop_mode()
        if self.redis is not None:
            self.redis.close()


@dataclass
class Supervised:
    """`python -m worker.supervisor -- <worker args>`: the replica a worker SIGKILL leaves running (restarted)."""

    proc: subprocess.Popen
    port: int
    log_path: Path

    @classmethod
    def start(cls, model_dir: Path, base: Path, worker_args, log) -> Supervised:
        base.mkdir(parents=True, exist_ok=True)
        port_file = base / "port"
        proc = subprocess.Popen([sys.executable, "-m", "worker.supervisor", "--port-file", str(port_file),
                                 "--backoff-initial", "0.2", "--", "--model", str(model_dir), "--port", "0",
                                 *worker_args], cwd=ROOT, stderr=log, env={**os.environ, "TMPDIR": str(base)})
        return cls(proc, _wait_port(proc, port_file, Path(log.name)), Path(log.name))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rank_pid(self) -> int:
        """The running worker process (the supervisor's last group_started)."""
        pids = [e["pids"][0] for e in _events(self.log_path) if e.get("event") == "group_started"]
        return pids[-1]

    def stop(self, timeout: float = 15.0) -> None:
        from worker.launch import stop_process

        stop_process(self.proc, timeout)


def _events(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


# ---- load


async def _wait_routable(address: str, key: str, num_workers: int, timeout_s: float = 60.0) -> str:
    """The model, once the router routes to every worker (each has answered, and with cache routing each has had
    a moment to send its snapshot: a request the router cannot place yet would be placed by load)."""
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        while time.monotonic() < deadline:
            try:
                resp = await stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {key}"),),
                                             timeout=5)
                if resp.models:
                    return resp.models[0].name
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"router {address} not routable within {timeout_s} s")


async def _one(stub, key: str, text: str, started: float, at_s: float) -> dict:
    params = pb.SamplingParameters(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    first = None
    usage = pb.Usage()
    try:
        async for chunk in stub.GenerateStream(pb.GenerateRequest(inputs=[text], parameters=params),
                                               metadata=(("authorization", f"Bearer {key}"),), timeout=300):
            if chunk.token_ids and first is None:
                first = time.perf_counter()
            if chunk.HasField("usage"):
                usage = chunk.usage
    except grpc.aio.AioRpcError as exc:
        return {"ok": False, "code": exc.code().name}
    return {"ok": first is not None, "ttft_ms": ((first or t0) - t0) * 1e3, "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": usage.cached_prompt_tokens, "completion_tokens": usage.completion_tokens,
            "late_ms": (t0 - started - at_s) * 1e3}


async def run_open(addresses: list[str], key: str, requests: list[Request]) -> tuple[list[dict], float]:
    """The requests at their arrival times, alternating over the routers; (results, wall seconds)."""
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    stubs = [pb_grpc.InferenceStub(c) for c in channels]
    started = time.perf_counter()

    async def at(i: int, req: Request) -> dict:
        await asyncio.sleep(max(0.0, started + req.at_s - time.perf_counter()))
        return await _one(stubs[i % len(stubs)], key, req.text, started, req.at_s)

    try:
        results = await asyncio.gather(*(at(i, r) for i, r in enumerate(requests)))
    finally:
        for c in channels:
            await c.close()
    return list(results), time.perf_counter() - started


async def run_closed(address: str, key: str, texts: list[str], streams: int, seconds: float) -> float:
    """Requests per second `streams` back-to-back streams sustain for `seconds`."""
    done = 0
    end = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.InferenceStub(ch)

        async def stream(s: int) -> None:
            nonlocal done
            i = s
            while time.perf_counter() < end:
                r = await _one(stub, key, texts[i % len(texts)], 0.0, 0.0)
                done += r["ok"]
                i += streams
        t0 = time.perf_counter()
        await asyncio.gather(*(stream(s) for s in range(streams)))
    return done / (time.perf_counter() - t0)


def run_kill(args, corpus: list[str], model: Path, tmp: Path, rate: float) -> dict:
    """Two supervised workers, cache routing, the shared workload for KILL_RUN_S; after KILL_AT_S worker 0's process
    is SIGKILLed (its supervisor restarts it on the same port). No request may fail (they fail over); the router's
    view of the killed worker must go at once, and the hit rate come back: the requests arriving from 5 s after the
    worker is healthy again against those before the kill."""
    cluster = Cluster(model, tmp, 2)
    try:
        cluster.start_redis()
        cluster.start("cache", "kill", supervised=True)
        address = f"127.0.0.1:{cluster.router_ports[0]}"
        asyncio.run(_wait_routable(address, cluster.key, 2))
        cluster.wait_cache_views()
        # a minute of arrivals: the kill after 15 s, the restarted worker back some 10 s later, then time to recover
        requests = make_workload(8, int(rate * KILL_RUN_S), rate, args.seed, None, corpus)
        kill_at = KILL_AT_S
        victim = cluster.workers[0]
        killed: dict = {}

        async def kill_later(started: float) -> None:
            await asyncio.sleep(max(0.0, started + kill_at - time.perf_counter()))
            killed["wall"], killed["at_s"] = time.time(), time.perf_counter() - started
            os.kill(victim.rank_pid(), signal.SIGKILL)

        async def both():
            started = time.perf_counter()
            killer = asyncio.ensure_future(kill_later(started))
            out = await run_open([address], cluster.key, requests)
            await killer
            return out

        results, wall = asyncio.run(both())
        events = _events(cluster.router_logs[0])
    finally:
        cluster.stop()
    ended = [e for e in events if e.get("event") in ("worker_cache_events_ended", "worker_unhealthy")
             and e.get("address") == victim.address]
    from datetime import datetime

    def ts(e: dict) -> float:
        return datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()

    cleared_after = min((ts(e) - killed["wall"] for e in ended if ts(e) >= killed["wall"] - 0.01), default=None)
    back = [ts(e) - killed["wall"] for e in events if e.get("event") == "worker_healthy"
            and e.get("address") == victim.address and ts(e) > killed["wall"]]
    back_at = killed["at_s"] + back[0] if back else float("inf")
    before = [r for r, q in zip(results, requests, strict=True) if q.at_s < killed["at_s"]]
    during = [r for r, q in zip(results, requests, strict=True) if killed["at_s"] <= q.at_s < back_at + 5]
    after = [r for r, q in zip(results, requests, strict=True) if q.at_s >= back_at + 5]

    def hit(rs):
        p = sum(r["prompt_tokens"] for r in rs if r["ok"])
        return sum(r["cached_tokens"] for r in rs if r["ok"]) / p if p else 0.0

    return {"errors": sum(not r["ok"] for r in results), "killed_at_s": killed["at_s"],
            "view_cleared_after_s": cleared_after, "healthy_again_after_s": back[0] if back else None,
            "hit_rate_phases": [hit(before), hit(during), hit(after)], "requests_after": len(after), "wall_s": wall}


# ---- main


def model_dir() -> Path:
    from worker.model.tiny import make_tiny_model

    path = Path(os.environ.get("LLAMAGRID_HOME", Path.home() / ".cache" / "llamagrid")) / "bench-llama-h256-l4"
    if not (path / "config.json").exists():
        tmp = Path(tempfile.mkdtemp(dir=path.parent if path.parent.exists() else None))
        make_tiny_model(tmp / "m", **MODEL)
        path.parent.mkdir(parents=True, exist_ok=True)
        (tmp / "m").rename(path)
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def run_workers(n: int, args, corpus: list[str], model: Path, tmp: Path) -> dict:
    extra = ("--cache-affinity-tokens", str(args.affinity)) if args.affinity else ()
    cluster = Cluster(model, tmp, n, router_args=extra)
    figures: dict = {}
    try:
        cluster.start_redis()
        rate = args.rate
        if rate is None:  # what load-only routing sustains on uncached-heavy traffic
            cluster.start("load", f"n{n}-calibrate")
            address = f"127.0.0.1:{cluster.router_ports[0]}"
            asyncio.run(_wait_routable(address, cluster.key, n))
            texts = [r.text for r in make_workload(4 * n, 64, 1.0, args.seed + 99, None, corpus)]
            rate = args.load * asyncio.run(run_closed(address, cluster.key, texts, 2 * n, args.calibrate_seconds))
            cluster.stop_mode()
        print(f"{n} workers: arrival rate {rate:.2f} req/s, {args.requests} requests per configuration", flush=True)
        for workload, hot in (() if args.kill_only else (("shared", None), ("skewed", 0.8))):
            requests = make_workload(4 * n, args.requests, rate, args.seed, hot, corpus)
            figures[workload] = {}
            for mode in MODES:
                tag = f"n{n}-{workload}-{mode.replace(' ', '')}"
                cluster.start(mode, tag)
                addresses = [f"127.0.0.1:{p}" for p in cluster.router_ports]
                for a in addresses:
                    asyncio.run(_wait_routable(a, cluster.key, n))
                if mode.startswith("cache"):
                    cluster.wait_cache_views()
                results, wall = asyncio.run(run_open(addresses, cluster.key, requests))
                s = summarise(results, wall, cluster.finished_lines())
                # capacity: back-to-back streams on the same requests (the caches as the open run left them)
                texts = [r.text for r in requests]
                s["output_tok_s"] = MAX_NEW_TOKENS * asyncio.run(
                    run_closed(addresses[0], cluster.key, texts, 4 * n, args.closed_seconds))
                figures[workload][mode] = s
                cluster.stop_mode()
                shares = " ".join(f"{v:.2f}" for v in s["prefill_shares"].values())
                print(f"  {workload:6} {mode:8} TTFT p50 {s['ttft_ms_p50']:7.0f} p90 {s['ttft_ms_p90']:7.0f} "
                      f"p99 {s['ttft_ms_p99']:7.0f} ms  {s['output_tok_s']:6.1f} tok/s  hit {s['hit_rate']:.2f}  "
                      f"prefill shares {shares} (busiest/mean {s['busiest_vs_mean']:.2f})  errors {s['errors']}",
                      flush=True)
        figures["rate"] = rate
    finally:
        cluster.stop()
    if n == 2 and args.kill:
        k = run_kill(args, corpus, model, tmp, rate)
        figures["kill"] = k
        cleared = k["view_cleared_after_s"]
        again = k["healthy_again_after_s"]
        print(f"  kill   cache    worker 0 SIGKILLed at {k['killed_at_s']:.1f} s: errors {k['errors']}, its view "
              f"dropped after {'never' if cleared is None else f'{cleared:.2f} s'}, healthy again after "
              f"{'never' if again is None else f'{again:.1f} s'}; hit rate before the kill, until 5 s after the "
              f"restart, after that ({k['requests_after']} requests) "
              f"{' '.join(f'{h:.2f}' for h in k['hit_rate_phases'])}", flush=True)
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="2,4", help="worker counts, comma-separated")
    ap.add_argument("--requests", type=int, default=None, help="requests per configuration (default 160; quick 40)")
    ap.add_argument("--rate", type=float, default=None, help="arrivals per second (default: calibrated)")
    ap.add_argument("--load", type=float, default=1.0, help="calibrated rate times this")
    ap.add_argument("--calibrate-seconds", type=float, default=None)
    ap.add_argument("--closed-seconds", type=float, default=None,
                    help="seconds of back-to-back streams per configuration, for its output tokens/s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--affinity", type=int, default=None, help="the routers' --cache-affinity-tokens (default theirs)")
    ap.add_argument("--quick", action="store_true", help="2 workers, 40 requests: a smoke run")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the run's directory (router and worker logs)")
    ap.add_argument("--kill-only", action="store_true", help="only the kill run (2 workers; give --rate)")
    ap.add_argument("--no-kill", dest="kill", action="store_false",
                    help="skip the run that SIGKILLs a supervised worker half-way (2 workers)")
    args = ap.parse_args()
    if args.quick:
        args.workers = "2"
    args.requests = args.requests or (40 if args.quick else 160)
    args.calibrate_seconds = args.calibrate_seconds or (8.0 if args.quick else 15.0)
    args.closed_seconds = args.closed_seconds or (8.0 if args.quick else 15.0)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    corpus = (ROOT / "worker" / "model" / "tiny_corpus.txt").read_text().split()
    model = model_dir()
    tmp = Path(tempfile.mkdtemp(prefix="llamagrid-prefix-bench-"))
    out: dict = {"config": {k: str(v) for k, v in vars(args).items()}, "workers": {}}
    ok = True
    try:
        for n in (int(x) for x in args.workers.split(",")):
            figures = run_workers(n, args, corpus, model, tmp)
            checks = verdict({k: v for k, v in figures.items() if k != "rate"})
            out["workers"][str(n)] = {"figures": figures, "checks": [{"name": a, "pass": b, "detail": c}
                                                                      for a, b, c in checks]}
            for name, passed, detail in checks:
                ok &= passed
                print(f"  {'PASS' if passed else 'FAIL'}: {n} workers, {name}: {detail}", flush=True)
    finally:
        if args.keep:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"overall: {'PASS' if ok else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
