"""`python -m router --processes N`: N router processes serving one port, sharing nothing but Redis.

One Python process runs one event loop on one core (the GIL, and grpc.aio's one loop per process), so a router uses
more cores as more processes. The kernel spreads them one port (SO_REUSEPORT): each accepted TCP connection goes to
one process, by a hash of its addresses, and stays there. Each process is a whole router of its own (its config,
worker pool, key cache and gRPC server) and registers in Redis' registry of live routers (ratelimit.peers), so a
tier's per-key caps divide over every process like over router replicas; rate limits live in Redis already.

This parent serves no gRPC. It starts the children (`python -m router` with the parent's own arguments, then
`--processes 1 --reuse-port`, the port and where to report), writes --port-file once every one serves, starts again
one that exits unexpectedly (after a backoff that grows while it keeps failing), forwards SIGTERM and SIGINT (each
child drains as a lone router does) and serves --metrics-port: every child's /metrics fetched at scrape time, each
sample labelled `process="<index>"` (MergedMetrics).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from common.log_throttle import Throttle
from common.metrics import serve_metrics, stop_metrics
from common.ports import free_port, write_port_file
from common.signals import until_terminated
from router.config import REDIS_URL_ENV, RouterConfig

log = structlog.get_logger("router.processes")

START_TIMEOUT_S = 60.0  # for every child to serve at start
BACKOFF_INITIAL_S = 0.5  # before starting again a child that exited; doubled per failure in a row
BACKOFF_MAX_S = 10.0
STABLE_AFTER_S = 30.0  # a child that ran this long before exiting starts again after the initial backoff
SCRAPE_TIMEOUT_S = 3.0  # a child's /metrics that takes longer is left out of that scrape
STOP_MARGIN_S = 10.0  # past a child's drain grace, then SIGKILL
POLL_S = 0.05
METRICS_HOST = "127.0.0.1"  # the children's own /metrics: the parent's merged one is the one to scrape
# OpenMetrics keeps a counter's _created sample in its family, so what the parent re-exposes is the same in both
# formats Prometheus negotiates
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@dataclass
class Child:
    """One router process slot; its process is replaced when it exits."""

    index: int
    port_file: Path
    proc: subprocess.Popen | None = None
    metrics_port: int | None = None
    serving: bool = False
    restarts: int = 0
    failures: int = 0  # exits in a row without STABLE_AFTER_S of running
    started_at: float = 0.0
    restart_at: float | None = None


class RouterProcesses:
    """The children of one `--processes N` router, started, watched and stopped from the main thread."""

    def __init__(self, config: RouterConfig, argv: list[str], run_dir: Path) -> None:
        self.config = config
        self.argv = list(argv)
        self.port = config.port  # 0 until child 0 has bound a free one, then the port every child binds
        self.children = [Child(i, run_dir / f"process-{i}.port") for i in range(config.processes)]
        self.stopping = threading.Event()
        self._lock = threading.Lock()  # children's state, read by the metrics thread

    # ---- start

    def start(self, timeout_s: float = START_TIMEOUT_S) -> bool:
        """Start every child and wait until all serve: child 0 first when the port is 0 (it picks the port the
        others then bind). False if one exits first, time runs out, or a stop was asked for meanwhile."""
        deadline = time.monotonic() + timeout_s
        if self.port == 0:
            self._spawn(self.children[0])
            if not self._wait_serving(self.children[:1], deadline):
                return False
            self.port = int(self.children[0].port_file.read_text())  # (write_port_file: never half-written)
            rest = self.children[1:]
        else:
            rest = self.children
        for child in rest:
            self._spawn(child)
        return self._wait_serving(rest, deadline)

    def _wait_serving(self, children: list[Child], deadline: float) -> bool:
        while not self.stopping.is_set():
            for child in children:
                self._note_serving(child)
            if all(c.serving for c in children):
                return True
            exited = [c for c in children if c.proc.poll() is not None]
            if exited or time.monotonic() > deadline:
                for c in exited:
                    log.error("router_process_failed_to_start", process=c.index, exit_code=c.proc.returncode)
                if not exited:
                    log.error("router_processes_start_timeout", timeout_s=START_TIMEOUT_S,
                              serving=sum(c.serving for c in children), processes=len(children))
                return False
            self.stopping.wait(POLL_S)
        return False

    def _spawn(self, child: Child) -> None:
        child.port_file.unlink(missing_ok=True)
        metrics_port = free_port(METRICS_HOST) if self.config.metrics_port is not None else None
        extra = ["--processes", "1", "--reuse-port", "--port", str(self.port), "--port-file", str(child.port_file),
                 "--process-index", str(child.index)]
        if metrics_port is not None:
            extra += ["--metrics-host", METRICS_HOST, "--metrics-port", str(metrics_port)]
        # the URL through the environment, not argv: it may carry a password, and `ps` shows argv
        env = {**os.environ, REDIS_URL_ENV: self.config.redis_url or ""}
        # a session of its own: a terminal's Ctrl-C reaches the parent, which stops the children in order
        proc = subprocess.Popen([sys.executable, "-m", "router", *self.argv, *extra], env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        with self._lock:
            child.proc, child.metrics_port, child.serving = proc, metrics_port, False
            child.started_at, child.restart_at = time.monotonic(), None
        log.info("router_process_started", process=child.index, pid=proc.pid, restarts=child.restarts)

    def _note_serving(self, child: Child) -> None:
        if child.proc is not None and not child.serving and child.port_file.exists():
            port = int(child.port_file.read_text())
            with self._lock:
                child.serving = True
            log.info("router_process_serving", process=child.index, pid=child.proc.pid, port=port,
                     restarts=child.restarts)

    # ---- run

    def supervise(self) -> None:
        """Until a stop is asked for: note children that serve, start again those that exited."""
        while not self.stopping.wait(POLL_S):
            now = time.monotonic()
            for child in self.children:
                self._note_serving(child)
                if child.proc is not None and child.proc.poll() is not None:
                    self._exited(child, now)
                elif child.proc is None and child.restart_at is not None and now >= child.restart_at:
                    child.restarts += 1
                    self._spawn(child)

    def _exited(self, child: Child, now: float) -> None:
        code = child.proc.returncode
        child.failures = 1 if now - child.started_at >= STABLE_AFTER_S else child.failures + 1
        backoff_s = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** (child.failures - 1))
        with self._lock:
            child.proc, child.serving, child.restart_at = None, False, now + backoff_s
        log.warning("router_process_exited", process=child.index, exit_code=code, restarts=child.restarts,
                    failures_in_a_row=child.failures, backoff_s=backoff_s)

    # ---- stop

    def stop(self) -> int:
        """SIGTERM every child (each drains for its drain grace), SIGKILL those still running past it; 0 when
        every child exited 0."""
        self.stopping.set()
        running = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        for child in running:
            child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.drain_grace_s + STOP_MARGIN_S
        codes = []
        for child in running:
            try:
                codes.append(child.proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                codes.append(child.proc.wait())
                log.error("router_process_killed", process=child.index, pid=child.proc.pid)
        log.info("router_processes_stopped", processes=len(running), failed=sum(code != 0 for code in codes))
        return 0 if all(code == 0 for code in codes) else 1

    # ---- for the metrics thread

    def snapshot(self) -> list[tuple[int, int | None, bool, int]]:
        """(index, metrics port, serving, restarts) of each child."""
        with self._lock:
            return [(c.index, c.metrics_port, c.serving and c.proc is not None, c.restarts) for c in self.children]


class MergedMetrics:
    """A prometheus_client collector: at each scrape, every serving child's /metrics (fetched in parallel, parsed)
    re-yielded once per family with `process="<index>"` on every sample, so `sum without (process)` gives the
    router's totals and each counter stays monotonic per process (it restarts at 0 with its process, as a lone
    router's does). A child that does not answer within `timeout_s` is left out of that scrape: its series are
    missing, never stale. Plus the parent's own llamagrid_router_processes and ..._process_restarts_total."""

    def __init__(self, snapshot: Callable[[], list[tuple[int, int | None, bool, int]]],
                 timeout_s: float = SCRAPE_TIMEOUT_S) -> None:
        self._snapshot = snapshot
        self._timeout_s = timeout_s
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
        self._pool = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="router-scrape")
        self._failures = Throttle(60.0)

    def describe(self):
        return []  # (else registering would scrape the children)

    def collect(self):
        children = self._snapshot()
        fetches = {index: self._pool.submit(self._fetch, port)
                   for index, port, serving, _ in children if serving and port is not None}
        concurrent.futures.wait(fetches.values(), timeout=self._timeout_s)
        families: dict[str, Metric] = {}
        for index, future in sorted(fetches.items()):
            try:
                if not future.done():
                    future.cancel()
                    raise TimeoutError
                parsed = list(text_string_to_metric_families(future.result()))
            except Exception as exc:  # a child busy, restarting or gone: its series sit this scrape out
                self._failures.warn(log, "router_process_scrape_failed", key=index, process=index,
                                    error=type(exc).__name__)
                continue
            for family in parsed:
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                                 family.unit))
                if merged.type != family.type:
                    continue
                for s in family.samples:
                    merged.add_sample(s.name, {**s.labels, "process": str(index)}, s.value, s.timestamp,
                                      s.exemplar)
        yield from families.values()
        yield GaugeMetricFamily("llamagrid_router_processes", "Router processes serving (--processes).",
                                value=sum(serving for _, _, serving, _ in children))
        restarts = CounterMetricFamily("llamagrid_router_process_restarts",
                                       "Router processes started again after exiting, by process index.",
                                       labels=["process"])
        for index, _, _, count in children:
            restarts.add_metric([str(index)], count)
        yield restarts

    def _fetch(self, port: int) -> str:
        request = urllib.request.Request(f"http://{METRICS_HOST}:{port}/metrics", headers={"Accept": OPENMETRICS})
        with self._opener.open(request, timeout=self._timeout_s) as response:
            return response.read().decode()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def run_processes(config: RouterConfig, argv: list[str], port_file: Path | None) -> int:
    """The parent of `config.processes` routers (config.redis_url set: the caller started any embedded Redis).
    `argv`: the parent's own arguments, given to every child before its own. Returns the exit status: 0 when
    stopped by a signal and every child drained, 1 when a child did not start or did not stop cleanly."""
    run_dir = Path(tempfile.mkdtemp(prefix="llamagrid-router-"))
    fleet = RouterProcesses(config, argv, run_dir)
    signalled = threading.Event()

    def on_signal(*_) -> None:
        signalled.set()
        fleet.stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    metrics = metrics_http = None
    started = False
    try:
        if config.metrics_port is not None:
            registry = CollectorRegistry(auto_describe=False)
            metrics = MergedMetrics(fleet.snapshot)
            registry.register(metrics)
            metrics_http = serve_metrics(registry, config.metrics_host or config.host, config.metrics_port)
            log.info("metrics_serving", port=metrics_http.server_port)
        started = fleet.start()
        if started:
            if port_file is not None:
                write_port_file(port_file, fleet.port)
            log.info("router_processes_serving", processes=config.processes, port=fleet.port)
            fleet.supervise()
    finally:
        code = fleet.stop()
        if metrics_http is not None:
            stop_metrics(metrics_http)
        if metrics is not None:
            metrics.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    return code if started or signalled.is_set() else 1


async def until_terminated_or_orphaned(parent_pid: int, interval_s: float = 1.0) -> None:
    """In a child: until SIGTERM or SIGINT, or until the parent that started it is gone (killed: nobody would stop
    or restart this process any more, so it drains and exits rather than serve on unwatched)."""
    signalled = asyncio.ensure_future(until_terminated())
    try:
        while not signalled.done():
            if os.getppid() != parent_pid:
                log.warning("router_process_orphaned", parent_pid=parent_pid)
                return
            await asyncio.wait({signalled}, timeout=interval_s)
    finally:
        signalled.cancel()


def whole_line_stderr() -> None:
    """Make each line written to stderr one write(2), before logging is configured: the processes of a
    --processes router share one stderr, and Python's own (unbuffered when not a terminal) writes a line and its
    newline separately, so two processes' lines could interleave mid-line. A line up to the buffer's size (far
    beyond any log line) goes out whole; on a pipe, up to PIPE_BUF (4 KiB) is atomic."""
    stream = sys.stderr
    raw = io.FileIO(stream.fileno(), "w", closefd=False)
    sys.stderr = io.TextIOWrapper(io.BufferedWriter(raw, buffer_size=1 << 16), encoding=stream.encoding,
                                  errors="backslashreplace", line_buffering=True)
