"""The router's HTTP edge against its gRPC API: the same streamed requests through the same router, in one run.

Setup (local processes, all stopped on exit): the tests' scripted fake worker in a process of its own (a real gRPC
server speaking the Worker API that streams `--max-new-tokens` tokens as fast as it can, so the router's own work is
what is measured), a redis-server, bench/router_overhead.py's tier file (limits nobody reaches) and API key, and one
router process with `--http-port`.

- gRPC: llamagrid.v1 GenerateStream (grpc.aio client), one text input.
- HTTP: POST /v1/completions with "stream": true (server-sent events), the same prompt and parameters, through a
  minimal HTTP/1.1 keep-alive client written on asyncio streams (one connection per stream), so that the client's
  own cost stays small next to the router's on this shared machine.

At 1 stream: `--pairs` requests of each, alternating in a random order per pair; whole-request latency, and the
median of the paired differences HTTP - gRPC with a 95% bootstrap interval (the added p50). At `--streams` (128)
streams: blocks of `--block-seconds` alternating gRPC, HTTP, gRPC, HTTP... (`--rounds` each, after a warm-up of
each): requests/s, streamed tokens/s, TTFT p50/p99 (call start to the first event with text), and the CPU seconds of
the router in those blocks; then HTTP / gRPC.

    .venv/bin/python bench/http_vs_grpc.py              # full run (about 2 minutes)
    .venv/bin/python bench/http_vs_grpc.py --quick      # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.router_overhead import PEPPER, _cpu_seconds, create_key, write_tiers  # noqa: E402
from bench.router_processes import _wait_port  # noqa: E402
from bench.workload import percentile  # noqa: E402
from protos.llamagrid.v1 import inference_pb2 as pb  # noqa: E402
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

PROMPT = "Explain how a rate limiter works in two sentences."


class HttpStream:
    """One keep-alive HTTP/1.1 connection sending streamed completions, reading chunked server-sent events."""

    def __init__(self, host: str, port: int, key: str, max_new: int) -> None:
        self.host, self.port = host, port
        body = json.dumps({"model": "fake-llama", "prompt": PROMPT, "max_tokens": max_new, "temperature": 0,
                           "stream": True, "ignore_eos": True}).encode()
        self.request = (f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {key}\r\n"
                        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body
        self.reader = self.writer = None

    async def one(self) -> tuple[float, float, int]:
        """(seconds to the first event with text, seconds to the end, events with text)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        t0 = time.perf_counter()
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
        first, events = None, 0
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                break
            if b'"text":"' in data and b'"text":""' not in data:
                events += data.count(b"data: {")
                if first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        return (first or end) - t0, end - t0, events

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class GrpcStream:
    def __init__(self, stub, key: str, max_new: int) -> None:
        self.stub = stub
        self.metadata = (("authorization", f"Bearer {key}"),)
        self.request = pb.GenerateRequest(inputs=[PROMPT], parameters=pb.SamplingParameters(
            max_new_tokens=max_new, temperature=0.0, ignore_eos=True))

    async def one(self) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        first, events = None, 0
        async for chunk in self.stub.GenerateStream(self.request, metadata=self.metadata, timeout=60):
            if chunk.text:
                events += 1
                if first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        return (first or end) - t0, end - t0, events


async def block(make, streams: int, seconds: float) -> dict:
    """`streams` streams sending requests back to back for `seconds`."""
    clients = [make() for _ in range(streams)]
    ttft, done, events = [], 0, 0
    end = time.perf_counter() + seconds

    async def run(c) -> None:
        nonlocal done, events
        while time.perf_counter() < end:
            first, _, n = await c.one()
            ttft.append(first)
            done += 1
            events += n

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(run(c) for c in clients))
    finally:
        for c in clients:
            if isinstance(c, HttpStream):
                c.close()
    wall = time.perf_counter() - t0
    return {"requests_s": done / wall, "events_s": events / wall, "ttft_ms_p50": 1e3 * percentile(ttft, 50),
            "ttft_ms_p99": 1e3 * percentile(ttft, 99), "wall_s": wall}


def bootstrap(diffs: list[float], rng: random.Random, n: int = 1000) -> tuple[float, float]:
    meds = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n)]


async def measure(args, grpc_address: str, http_port: int, key: str, router_pid: int) -> dict:
    rng = random.Random(args.seed)
    async with grpc.aio.insecure_channel(grpc_address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        g, h = GrpcStream(stub, key, args.max_new_tokens), HttpStream("127.0.0.1", http_port, key,
                                                                      args.max_new_tokens)
        for _ in range(20):  # warm-up: connections, the key's verification, code paths
            await g.one()
            await h.one()
        lat = {"grpc": [], "http": []}
        for _ in range(args.pairs):
            order = [("grpc", g), ("http", h)]
            rng.shuffle(order)
            for name, c in order:
                lat[name].append((await c.one())[1])
        h.close()
        diffs = [1e3 * (b - a) for a, b in zip(lat["grpc"], lat["http"], strict=True)]
        one = {"grpc_ms_p50": 1e3 * statistics.median(lat["grpc"]), "http_ms_p50": 1e3 * statistics.median(lat["http"]),
               "added_ms_p50": statistics.median(diffs), "added_ms_ci95": bootstrap(diffs, rng)}
        blocks = {"grpc": [], "http": []}
        cpu = {"grpc": 0.0, "http": 0.0}
        makers = {"grpc": lambda: GrpcStream(stub, key, args.max_new_tokens),
                  "http": lambda: HttpStream("127.0.0.1", http_port, key, args.max_new_tokens)}
        for r in range(args.rounds + 1):
            for name in ("grpc", "http") if r % 2 == 0 else ("http", "grpc"):
                before = _cpu_seconds(router_pid)
                result = await block(makers[name], args.streams, args.block_seconds)
                if r > 0:  # (round 0 warms up)
                    blocks[name].append(result)
                    cpu[name] += _cpu_seconds(router_pid) - before
    many = {}
    for name, bs in blocks.items():
        requests = sum(b["requests_s"] * b["wall_s"] for b in bs)
        many[name] = {k: statistics.median(b[k] for b in bs) for k in bs[0]}
        many[name]["router_cpu_ms_per_request"] = 1e3 * cpu[name] / requests
    return {"one_stream": one, "streams": many}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block-seconds", type=float, default=8.0)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.rounds, args.block_seconds = 40, 1, 3.0
    from ratelimit.redis_server import RedisServer
    from tests.support.fake_model import Script
    from tests.support.fake_process import FakeWorkerProcess

    tmp = Path(tempfile.mkdtemp(prefix="llamagrid-bench-http-"))
    worker = redis = router = None
    try:
        worker = FakeWorkerProcess(tmp / "fake-worker.log", Script(token_delay_s=0.0, max_num_seqs=4 * args.streams))
        redis = RedisServer().start()
        tiers = write_tiers(tmp / "tiers.toml")
        key = asyncio.run(create_key(redis.url))
        from common.ports import free_port

        http_port = free_port()
        log = open(tmp / "router.log", "w")  # noqa: SIM115 - closed with the router
        router = subprocess.Popen(
            [sys.executable, "-m", "router", "--workers", worker.address, "--port", "0", "--port-file",
             str(tmp / "router.port"), "--http-port", str(http_port), "--redis-url", redis.url, "--tiers", str(tiers),
             "--log-level", "warning", "--drain-grace", "5"],
            cwd=ROOT, env={**os.environ, "LLAMAGRID_KEY_PEPPER": PEPPER}, stdout=log, stderr=log)
        port = _wait_port(router, tmp / "router.port", tmp / "router.log")
        out = asyncio.run(measure(args, f"127.0.0.1:{port}", http_port, key, router.pid))
    finally:
        if router is not None:
            router.send_signal(signal.SIGTERM)
            router.wait(30)
        if worker is not None:
            worker.stop()
        if redis is not None:
            redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    one, many = out["one_stream"], out["streams"]
    lo, hi = one["added_ms_ci95"]
    print(f"1 stream: gRPC p50 {one['grpc_ms_p50']:.2f} ms, HTTP p50 {one['http_ms_p50']:.2f} ms; HTTP - gRPC "
          f"(paired median) {one['added_ms_p50']:+.2f} ms (95% CI {lo:+.2f}..{hi:+.2f})")
    for name in ("grpc", "http"):
        m = many[name]
        print(f"{args.streams} streams {name:4}: {m['requests_s']:7.1f} req/s  {m['events_s']:8.0f} events/s  TTFT p50 "
              f"{m['ttft_ms_p50']:6.1f} ms p99 {m['ttft_ms_p99']:6.1f} ms  router CPU "
              f"{m['router_cpu_ms_per_request']:.2f} ms/request")
    ratio = many["http"]["requests_s"] / many["grpc"]["requests_s"]
    ttft = many["http"]["ttft_ms_p50"] / many["grpc"]["ttft_ms_p50"]
    print(f"HTTP / gRPC at {args.streams} streams: throughput {ratio:.3f}x, TTFT p50 {ttft:.2f}x")
    print(f"{'PASS' if ratio >= 0.9 else 'FAIL'}: HTTP streaming throughput at least 0.9x gRPC's ({ratio:.3f}x)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
