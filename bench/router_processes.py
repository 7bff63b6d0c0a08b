"""Router processes: `python -m router --processes 2` against `--processes 1` at 512 client streams.

Setup (local processes, all stopped on exit, Ctrl-C or error): the scripted fake worker of the tests in a process of
its own (tests.support.fake_process: a real gRPC server speaking the Worker API, each reply a few tokens sent at once,
so the router's own work is what is measured), a redis-server, bench/router_overhead.py's tier file (limits nobody
reaches) and API key, and two routers in front of the fake worker, both running all along: `--processes 1` and
`--processes 2` (a parent and two router processes on one port, SO_REUSEPORT).

Load: `--streams 512` client streams over `--channels 32` connections per block (a local subchannel pool per
channel, so each is a TCP connection of its own, which the kernel hands to one router process), split over
`--client-processes` client processes (grpc.aio, one event loop each). Every stream sends GenerateStream requests
(`--max-new-tokens 4`: a few chunks) back to back for `--block-seconds`. Blocks alternate between the two routers
(1, 2, 1, 2, ...), after one warm-up block each, so drift on a busy machine hits both alike.

Reported per router: requests/s (those finished within the blocks' windows), TTFT p50/p99 (call start to the
first chunk with tokens), errors, the CPU seconds every process used in those windows (each router process, the
fake worker, Redis, the clients, this script) and the cores they used; then the throughput ratio 2 vs 1.
Everything shares this machine's cores, so the ratio is bounded by the machine as well as by the router: from the
CPU each request cost at 1 process, the bench prints the best ratio the machine allows (what the cores left after
the clients, the fake worker and Redis could give routers that cost the same per request) and the router's share
of the CPU. On 2 cores, where the clients and the fake worker take a large share, 2 processes cannot double
throughput however well they scale.

    .venv/bin/python bench/router_processes.py            # full run (about 2 minutes)
    .venv/bin/python bench/router_processes.py --quick    # smoke test (< 1 minute)
    .venv/bin/python bench/router_processes.py --streams 512 --channels 64 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.router_overhead import PEPPER, _cpu_seconds, create_key, write_tiers  # noqa: E402
from bench.workload import percentile  # noqa: E402
from protos.llamagrid.v1 import inference_pb2 as pb  # noqa: E402
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

PROMPT = "Explain how a rate limiter works in two sentences."
START_MARGIN_S = 1.0  # clients connect, then all start at the same instant


# ---- processes


@dataclass
class Router:
    """`python -m router --processes N` in front of the fake worker; its stderr (JSON lines) in a file."""

    processes: int
    proc: subprocess.Popen
    log_path: Path
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pids(self) -> dict[str, int]:
        """Name -> pid of every process of this router: `router` alone, or the parent and its processes."""
        if self.processes == 1:
            return {"router": self.proc.pid}
        out = {"parent": self.proc.pid}
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "router_process_started":
                    out[f"process {event['process']}"] = event["pid"]
        return out


@dataclass
class Setup:
    args: argparse.Namespace
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="llamagrid-bench-processes-")))
    worker: object | None = None
    redis: object | None = None
    routers: dict[int, Router] = field(default_factory=dict)
    key: str = ""
    _logs: list = field(default_factory=list)

    def start(self) -> Setup:
        from ratelimit.redis_server import RedisServer
        from tests.support.fake_model import Script
        from tests.support.fake_process import FakeWorkerProcess

        script = Script(token_delay_s=0.0, max_num_seqs=4 * self.args.streams)
        self.worker = FakeWorkerProcess(self.tmp / "fake-worker.log", script)
        self.redis = RedisServer().start()
        tiers = write_tiers(self.tmp / "tiers.toml")
        self.key = asyncio.run(create_key(self.redis.url))
        env = {**os.environ, "LLAMAGRID_KEY_PEPPER": PEPPER}
        for n in (1, 2):
            log_path = self.tmp / f"router-{n}.log"
            log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
            self._logs.append(log)
            proc = subprocess.Popen(
                [sys.executable, "-m", "router", "--processes", str(n), "--workers", self.worker.address,
                 "--port", "0", "--port-file", str(self.tmp / f"router-{n}.port"), "--redis-url", self.redis.url,
                 "--tiers", str(tiers), "--log-level", self.args.log_level, "--drain-grace", "5"],
                cwd=ROOT, env=env, stdout=log, stderr=log)
            self.routers[n] = Router(n, proc, log_path)
        for n, router in self.routers.items():
            router.port = _wait_port(router.proc, self.tmp / f"router-{n}.port", router.log_path)
        return self

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of every process but the clients (they count their own)."""
        out = {"fake worker": _cpu_seconds(self.worker.proc.pid), "redis": _cpu_seconds(self.redis.pid),
               "bench": time.process_time()}
        for n, router in self.routers.items():
            for name, pid in router.pids().items():
                out[f"router{n} {name}"] = _cpu_seconds(pid)
        return out

    def stop(self) -> None:
        for router in self.routers.values():
            if router.proc.poll() is None:
                router.proc.send_signal(signal.SIGTERM)
        for router in self.routers.values():
            try:
                router.proc.wait(20)
            except subprocess.TimeoutExpired:
                router.proc.kill()
                router.proc.wait()
        if self.worker is not None:
            self.worker.stop()
        if self.redis is not None:
            self.redis.close()
        for log in self._logs:
            log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _machine_busy_s() -> float:
    """CPU seconds every process of the machine has used (ours and others': /proc/stat, all CPUs)."""
    try:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (
            int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    except (OSError, ValueError):
        return float("nan")
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _wait_port(proc: subprocess.Popen, port_file: Path, log_path: Path, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"a router did not start; log:\n{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)
    return int(port_file.read_text())


# ---- clients (each in a process of its own)


async def _load(address: str, key: str, streams: int, channels: int, start_at: float, seconds: float,
                max_new: int) -> dict:
    options = [("grpc.use_local_subchannel_pool", 1)]  # n channels really are n TCP connections
    chans = [grpc.aio.insecure_channel(address, options=options) for _ in range(channels)]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in chans)), 30)
        stubs = [pb_grpc.InferenceStub(c) for c in chans]
        request = pb.GenerateRequest(inputs=[PROMPT], parameters=pb.SamplingParameters(
            max_new_tokens=max_new, temperature=0.0, ignore_eos=True))
        metadata = (("authorization", f"Bearer {key}"),)
        ttft_ms: list[float] = []
        errors: dict[str, int] = {}
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        end_at = start_at + seconds
        cpu = [time.process_time()]

        async def window_cpu() -> None:
            await asyncio.sleep(max(0.0, end_at - time.monotonic()))
            cpu.append(time.process_time())

        async def stream(i: int) -> None:
            stub = stubs[i % channels]
            while time.monotonic() < end_at:
                t0 = time.perf_counter()
                first, tokens = None, 0
                try:
                    async for chunk in stub.GenerateStream(request, metadata=metadata, timeout=60):
                        if chunk.token_ids and first is None:
                            first = time.perf_counter()
                        tokens += len(chunk.token_ids)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                    continue
                if tokens != max_new:
                    errors["SHORT"] = errors.get("SHORT", 0) + 1
                elif time.monotonic() <= end_at:  # (the window's last requests end after it: not counted)
                    ttft_ms.append((first - t0) * 1e3)

        await asyncio.gather(window_cpu(), *(stream(i) for i in range(streams)))
        return {"ttft_ms": ttft_ms, "errors": errors, "cpu_s": cpu[1] - cpu[0]}
    finally:
        for c in chans:
            await c.close()


def _client_main(conn) -> None:
    """A client process: runs the blocks it is sent until it is sent None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench's own Ctrl-C stops everything in order
    while (job := conn.recv()) is not None:
        conn.send(asyncio.run(_load(**job)))


def _spread(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


@dataclass
class Clients:
    count: int
    pipes: list = field(default_factory=list)
    procs: list = field(default_factory=list)

    def start(self) -> Clients:
        ctx = multiprocessing.get_context("spawn")  # (never fork a process that may hold gRPC's threads)
        for _ in range(self.count):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_client_main, args=(theirs,), daemon=True)
            proc.start()
            self.pipes.append(ours)
            self.procs.append(proc)
        return self

    def run(self, address: str, key: str, streams: int, channels: int, seconds: float, max_new: int,
            setup: Setup) -> dict:
        """One block: every client starts at the same instant; the requests finished within the block's `seconds`
        are counted, and the CPU every process used in that window."""
        start_at = time.monotonic() + START_MARGIN_S
        for pipe, n_streams, n_channels in zip(self.pipes, _spread(streams, self.count),
                                               _spread(channels, self.count), strict=True):
            pipe.send({"address": address, "key": key, "streams": n_streams, "channels": max(1, n_channels),
                       "start_at": start_at, "seconds": seconds, "max_new": max_new})
        time.sleep(max(0.0, start_at - time.monotonic()))
        cpu0, busy0 = setup.cpu(), _machine_busy_s()
        time.sleep(max(0.0, start_at + seconds - time.monotonic()))
        cpu1, busy1 = setup.cpu(), _machine_busy_s()
        results = [pipe.recv() for pipe in self.pipes]
        cpu = {name: cpu1[name] - cpu0.get(name, 0.0) for name in cpu1}
        cpu["clients"] = sum(r["cpu_s"] for r in results)
        errors: dict[str, int] = {}
        for r in results:
            for code, n in r["errors"].items():
                errors[code] = errors.get(code, 0) + n
        return {"wall_s": seconds, "ttft_ms": [x for r in results for x in r["ttft_ms"]], "errors": errors, "cpu": cpu,
                "machine_busy_s": busy1 - busy0}

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


# ---- figures


def summarise(blocks: list[dict], n: int) -> dict:
    wall = sum(b["wall_s"] for b in blocks)
    ttft = [x for b in blocks for x in b["ttft_ms"]]
    cpu: dict[str, float] = {}
    for b in blocks:
        for name, seconds in b["cpu"].items():
            cpu[name] = cpu.get(name, 0.0) + seconds
    errors: dict[str, int] = {}
    for b in blocks:
        for code, count in b["errors"].items():
            errors[code] = errors.get(code, 0) + count
    mine = {name: s for name, s in cpu.items() if name.startswith(f"router{n} ")}
    idle = {name: s for name, s in cpu.items() if name.startswith("router") and name not in mine}
    requests = len(ttft)
    return {"requests": requests, "wall_s": wall, "rps": requests / wall, "ttft_ms_p50": percentile(ttft, 50),
            "ttft_ms_p99": percentile(ttft, 99), "errors": errors, "cpu_s": cpu, "router_cpu_s": sum(mine.values()),
            "idle_router_cpu_s": sum(idle.values()), "total_cpu_s": sum(cpu.values()),
            "cores_used": sum(cpu.values()) / wall,
            "machine_cores_busy": sum(b["machine_busy_s"] for b in blocks) / wall}


def bound(one: dict, two: dict, cpus: int, client_processes: int) -> dict:
    """The throughput 2 router processes could reach at most on this machine, from what each request cost at 1:
    the cores left to this benchmark (all of them, less what other processes used during the 2-process blocks),
    the routers (2 processes, a core each), the clients (a core per client process) and the fake worker (one event
    loop: a core). As a ratio to what 1 process reached."""
    per_request = {name: s / one["requests"] for name, s in one["cpu_s"].items()}
    router = one["router_cpu_s"] / one["requests"]
    rest = (one["total_cpu_s"] - one["router_cpu_s"]) / one["requests"]  # clients, fake worker, Redis, idle router
    others = max(0.0, two["machine_cores_busy"] - two["cores_used"])
    ceilings = {"machine": (cpus - others) / (router + rest), "routers": 2 / router,
                "clients": client_processes / per_request["clients"],
                "fake worker": 1 / per_request["fake worker"]}
    limit = min(ceilings, key=ceilings.get)
    return {"ceilings_rps": ceilings, "limited_by": limit, "max_ratio": ceilings[limit] / one["rps"],
            "router_share": router / (router + rest), "router_cores_at_1": one["router_cpu_s"] / one["wall_s"],
            "router_ms_per_request": 1e3 * router, "rest_ms_per_request": 1e3 * rest, "others_cores": others}


def print_figures(out: dict, args: argparse.Namespace) -> None:
    cpus = out["cpus"]
    print(f"\n{args.streams} streams over {args.channels} connections from {args.client_processes} client "
          f"process(es), {args.max_new_tokens} tokens per request, {len(out['blocks'][1])} block(s) of "
          f"{args.block_seconds:.0f} s per router; machine: {cpus} CPU(s)")
    print(f"  {'router':<13} {'requests':>8} {'req/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'errors':>7} "
          f"{'router cpu s':>12} {'all cpu s':>9} {'cores used':>10} {'machine busy':>12}")
    for n in (1, 2):
        s = out[n]
        errors = sum(s["errors"].values())
        print(f"  --processes {n} {s['requests']:>8} {s['rps']:>8.1f} {s['ttft_ms_p50']:>7.1f}ms "
              f"{s['ttft_ms_p99']:>7.1f}ms {errors:>7} {s['router_cpu_s']:>12.2f} {s['total_cpu_s']:>9.2f} "
              f"{s['cores_used']:>6.2f}/{cpus} {s['machine_cores_busy']:>8.2f}/{cpus}")
    for n in (1, 2):
        s = out[n]
        parts = ", ".join(f"{name} {seconds:.2f}" for name, seconds in sorted(s["cpu_s"].items()))
        print(f"  cpu s during --processes {n} blocks: {parts}")
        if s["errors"]:
            print(f"  errors during --processes {n} blocks: {s['errors']}")
    b = out["bound"]
    ceilings = ", ".join(f"{name} {rps:.0f}" for name, rps in b["ceilings_rps"].items())
    print("  (cores used: this benchmark's processes; machine busy: every process on the machine, others' too)")
    rounds = ", ".join(f"{r:.2f}" for r in out["round_ratios"])
    print(f"\n  throughput 2 vs 1: {out['ratio']:.3f}x overall; per round (adjacent blocks) {rounds}, median "
          f"{out['median_round_ratio']:.3f}x")
    print(f"  TTFT 2 vs 1: p50 {out[2]['ttft_ms_p50'] - out[1]['ttft_ms_p50']:+.1f} ms, "
          f"p99 {out[2]['ttft_ms_p99'] - out[1]['ttft_ms_p99']:+.1f} ms")
    print(f"  at 1 process the router used {b['router_cores_at_1']:.2f} core(s), {b['router_ms_per_request']:.2f} ms "
          f"CPU per request; everything else {b['rest_ms_per_request']:.2f} ms per request: the router's share "
          f"of the CPU was {100 * b['router_share']:.0f}%")
    print(f"  other processes on the machine used {b['others_cores']:.2f} core(s) during the 2-process blocks, "
          f"leaving {cpus - b['others_cores']:.2f} to this benchmark")
    print(f"  req/s ceilings for 2 processes at those costs: {ceilings}; the lowest ({b['limited_by']}) allows "
          f"at most {b['max_ratio']:.2f}x, and the run reached {out['ratio'] / b['max_ratio']:.0%} of it (an estimate: "
          f"all the CPU per request was {1e3 * out[1]['total_cpu_s'] / out[1]['requests']:.2f} ms at 1 process, "
          f"{1e3 * out[2]['total_cpu_s'] / out[2]['requests']:.2f} ms at 2)")
    if out[2]["machine_cores_busy"] >= 0.95 * cpus:
        print(f"  at 2 processes the machine was saturated ({out[2]['machine_cores_busy']:.2f} of {cpus} cores busy): "
              f"the ratio measured is the machine's ceiling, not the router's")
    if b["router_cores_at_1"] < 0.9:
        print(f"  (at 1 process the router was not CPU-bound: {b['router_cores_at_1']:.2f} core(s) busy while "
              f"{args.streams} streams waited; a second process adds an event loop and a gRPC server, not only a "
              f"core)")


def run(args: argparse.Namespace) -> dict:
    setup = Setup(args)
    clients = Clients(args.client_processes)
    try:
        t0 = time.perf_counter()
        setup.start()
        clients.start()
        print(f"started the fake worker {setup.worker.address}, redis {setup.redis.url}, routers "
              f"--processes 1 on {setup.routers[1].address} and --processes 2 on {setup.routers[2].address}, "
              f"{args.client_processes} client process(es) in {time.perf_counter() - t0:.1f} s", flush=True)
        for n in (1, 2):  # warm-up: connections, caches, each router process's pool has seen the worker
            clients.run(setup.routers[n].address, setup.key, args.streams, args.channels, args.warmup_seconds,
                        args.max_new_tokens, setup)
        blocks: dict[int, list[dict]] = {1: [], 2: []}
        for r in range(args.rounds):
            for n in ((1, 2) if r % 2 == 0 else (2, 1)):
                block = clients.run(setup.routers[n].address, setup.key, args.streams, args.channels,
                                    args.block_seconds, args.max_new_tokens, setup)
                blocks[n].append(block)
                print(f"  round {r + 1} --processes {n}: {len(block['ttft_ms']) / block['wall_s']:.1f} req/s, "
                      f"TTFT p50 {percentile(block['ttft_ms'], 50):.1f} ms, errors {sum(block['errors'].values())}",
                      flush=True)
    finally:
        clients.stop()
        setup.stop()
    out = {n: summarise(blocks[n], n) for n in (1, 2)}
    out["blocks"] = blocks
    out["cpus"] = os.cpu_count()
    out["ratio"] = out[2]["rps"] / out[1]["rps"]
    out["round_ratios"] = [len(b2["ttft_ms"]) / len(b1["ttft_ms"]) for b1, b2 in zip(blocks[1], blocks[2], strict=True)]
    out["median_round_ratio"] = statistics.median(out["round_ratios"])
    out["bound"] = bound(out[1], out[2], out["cpus"], args.client_processes)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=512, help="concurrent client streams")
    ap.add_argument("--channels", type=int, default=32, help="client connections the streams are spread over")
    ap.add_argument("--client-processes", type=int, default=None,
                    help="client processes the streams and connections are split over (default: the CPUs, max 4)")
    ap.add_argument("--max-new-tokens", type=int, default=4, help="tokens per request (the fake worker's reply)")
    ap.add_argument("--rounds", type=int, default=None, help="blocks per router, alternating (default 4; quick 2)")
    ap.add_argument("--block-seconds", type=float, default=None, help="seconds per block (default 8; quick 5)")
    ap.add_argument("--warmup-seconds", type=float, default=None, help="a warm-up block per router (default 3)")
    ap.add_argument("--log-level", default="info", help="the routers' log level (as deployed: one line per call)")
    ap.add_argument("--quick", action="store_true", help="a short smoke run (< 1 minute)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    args.client_processes = args.client_processes or min(4, os.cpu_count() or 1)
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.block_seconds = args.block_seconds or (5.0 if args.quick else 8.0)
    args.warmup_seconds = args.warmup_seconds or (2.0 if args.quick else 3.0)
    if args.streams < 1 or args.channels < 1 or args.client_processes < 1 or args.rounds < 1:
        ap.error("--streams, --channels, --client-processes and --rounds must be >= 1")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        out = run(args)
    except KeyboardInterrupt:
        print("interrupted; stopping processes", file=sys.stderr)
        return 130
    print_figures(out, args)
    if args.json:
        figures = {str(n): {k: v for k, v in out[n].items()} for n in (1, 2)}
        args.json.write_text(json.dumps({"config": {k: (str(v) if isinstance(v, Path) else v)
                                                    for k, v in vars(args).items()},
                                         "cpus": out["cpus"], "ratio": out["ratio"],
                                         "round_ratios": out["round_ratios"], "bound": out["bound"],
                                         "routers": figures}, indent=2))
    return 0 if math.isfinite(out["ratio"]) else 1


if __name__ == "__main__":
    sys.exit(main())
