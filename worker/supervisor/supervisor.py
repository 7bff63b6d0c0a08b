"""The watch-and-restart loop: start a rank group, watch it, tear it down on any failure, start a new one."""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from common.metrics import serve_metrics, stop_metrics
from common.ports import free_port, write_port_file
from worker.config import build_parser as build_worker_parser
from worker.supervisor.causes import CRASH, HUNG, Failure, classify_exit
from worker.supervisor.group import SupervisedGroup, become_subreaper
from worker.supervisor.metrics import SupervisorMetrics
from worker.supervisor.policy import Backoff, CrashLoop

log = structlog.get_logger("worker.supervisor")

CRASH_LOOP_EXIT_CODE = 1


@dataclass(frozen=True, slots=True)
class SupervisorConfig:
    port_file: Path | None = None  # written once the first group serves; default: the worker args' --port-file
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    stable_after_s: float = 60.0  # a group serving this long resets the backoff
    heartbeat_timeout_s: float = 10.0
    startup_grace_s: float = 900.0  # until the group serves (loading a 70B checkpoint takes minutes)
    crash_loop_max_failures: int = 5
    crash_loop_window_s: float = 600.0
    stop_timeout_s: float = 40.0  # SIGTERM -> SIGKILL when the supervisor stops (the worker drains 30 s)
    kill_timeout_s: float = 5.0  # SIGTERM -> SIGKILL for what is left of a failed group
    poll_interval_s: float = 0.1
    metrics_port: int | None = None  # Prometheus /metrics (worker.supervisor.metrics); None = off, 0 = a free port
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError("metrics port must be in 0..65535")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError("need 0 < backoff initial <= backoff max")
        if self.crash_loop_max_failures < 1:
            raise ValueError("crash-loop max failures must be at least 1")
        for name in ("heartbeat_timeout_s", "startup_grace_s", "crash_loop_window_s", "stop_timeout_s",
                     "kill_timeout_s", "poll_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


@dataclass(frozen=True, slots=True)
class WorkerCommand:
    """`python -m worker <args>` with the fixed port, and per start a port file and run dir."""

    args: tuple[str, ...]
    port: int
    num_ranks: int
    port_file: Path | None  # from the worker args

    @classmethod
    def from_args(cls, args: list[str]) -> WorkerCommand:
        ns = build_worker_parser().parse_args(args)  # bad worker flags fail here, not in a crash loop
        port = ns.port or free_port(ns.host)
        return cls(tuple(args), port, ns.tp, ns.port_file)

    def argv(self, run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "worker", *self.args, "--port", str(self.port),
                "--port-file", str(run_dir / "port"), "--run-dir", str(run_dir)]


class Supervisor:
    def __init__(self, config: SupervisorConfig, command: WorkerCommand) -> None:
        self.config = config
        self.command = command
        self.port_file = config.port_file or command.port_file
        self.backoff = Backoff(config.backoff_initial_s, config.backoff_max_s, config.stable_after_s)
        self.crash_loop = CrashLoop(config.crash_loop_max_failures, config.crash_loop_window_s)
        self.stop_signal: int | None = None
        self.is_forced = False  # a second signal: skip the drain
        self.num_starts = 0
        self.group: SupervisedGroup | None = None
        self.metrics = SupervisorMetrics()

    def run(self) -> int:
        """Supervise until told to stop (0) or a crash loop (1)."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        become_subreaper()
        run_root = Path(tempfile.mkdtemp(prefix="llamagrid-supervisor-"))
        metrics_http = None
        if self.config.metrics_port is not None:
            metrics_http = serve_metrics(self.metrics.registry, self.config.metrics_host, self.config.metrics_port)
            log.info("metrics_serving", port=metrics_http.server_port)
        try:
            return self._loop(run_root)
        finally:
            if metrics_http is not None:
                stop_metrics(metrics_http)
            if self.group is not None:  # only on an unexpected exception: never leave the group behind
                self.group.signal_group(signal.SIGKILL)
                self.group.wait_empty(self.config.kill_timeout_s)
            shutil.rmtree(run_root, ignore_errors=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        else:
            self.is_forced = True

    def _loop(self, run_root: Path) -> int:
        while self.stop_signal is None:
            self.num_starts += 1
            self.metrics.starts.inc()
            run_dir = run_root / f"start-{self.num_starts}"
            self.group = SupervisedGroup.start(self.command.argv(run_dir), run_dir, self.command.num_ranks,
                                               attempt=self.num_starts)
            log.info("group_started", attempt=self.num_starts, pids=[self.group.proc.pid], port=self.command.port,
                     num_ranks=self.command.num_ranks)
            failure, serving_s = self._watch(self.group)
            if failure is None:
                self._stop(self.group)
                self.group = None
                return 0
            log.warning("group_failed", attempt=self.num_starts, cause=failure.cause, rank=failure.rank,
                        exit_code=failure.exit_code, signal=failure.signal, heartbeat_age_s=failure.heartbeat_age_s,
                        serving_s=None if serving_s is None else round(serving_s, 2))
            self.metrics.failed(failure.cause)
            self._tear_down(self.group, failure)
            self.group = None
            shutil.rmtree(run_dir, ignore_errors=True)
            if self.crash_loop.record(time.monotonic()):
                log.error("crash_loop", attempts=self.num_starts, failures=self.crash_loop.num_recent,
                          window_s=self.config.crash_loop_window_s, last_cause=failure.cause)
                self.metrics.crash_looped.set(1)
                return CRASH_LOOP_EXIT_CODE
            if self.stop_signal is None:
                self.metrics.restarting(failure.cause)
                delay = self.backoff.next_delay(serving_s)
                log.info("group_restarting", backoff_s=delay, attempt=self.num_starts + 1,
                         failures_in_window=self.crash_loop.num_recent)
                self._sleep(delay)
        log.info("supervisor_stopping", signal=signal.Signals(self.stop_signal).name, attempt=self.num_starts,
                 group_running=False)
        return 0

    def _watch(self, group: SupervisedGroup) -> tuple[Failure | None, float | None]:
        """Until the group fails (its Failure and how long it served) or a stop is asked for (None)."""
        config = self.config
        serving_since: float | None = None  # monotonic
        serving_wall = 0.0
        while self.stop_signal is None:
            serving_s = None if serving_since is None else time.monotonic() - serving_since
            returncode = group.proc.poll()
            if returncode is not None:
                return classify_exit(returncode), serving_s
            dead = group.dead_ranks()
            if dead:
                return Failure(CRASH, dead[0]), serving_s
            if serving_since is None:
                if group.is_serving():
                    serving_since, serving_wall = time.monotonic(), time.time()
                    self._on_serving(group)
                elif time.monotonic() - group.started_at > config.startup_grace_s:
                    return Failure(HUNG, 0), None
            else:
                stale = group.stale_ranks(config.heartbeat_timeout_s, since=serving_wall)
                if stale:
                    rank = min(stale)
                    return Failure(HUNG, rank, heartbeat_age_s=stale[rank]), serving_s
            time.sleep(config.poll_interval_s)
        return None, None

    def _on_serving(self, group: SupervisedGroup) -> None:
        self.metrics.serving.set(1)
        log.info("group_serving", attempt=self.num_starts, startup_s=round(time.monotonic() - group.started_at, 2),
                 port=self.command.port, pids=sorted(group.pids().values()))
        if self.port_file is not None and not self.port_file.exists():
            write_port_file(self.port_file, self.command.port)

    def _tear_down(self, group: SupervisedGroup, failure: Failure) -> None:
        """Stop every rank of a failed group and reap them; a hung or killed group gets no grace."""
        group.signal_group(signal.SIGKILL if failure.needs_sigkill else signal.SIGTERM)
        if not group.wait_empty(self.config.kill_timeout_s):
            group.signal_group(signal.SIGKILL)
            if not group.wait_empty(60.0):  # e.g. stuck in the GPU driver; starting anyway is all we can do
                log.error("group_not_empty", attempt=self.num_starts, pgid=group.pgid)

    def _stop(self, group: SupervisedGroup) -> None:
        """Asked to stop: rank 0 drains on SIGTERM; SIGKILL after the stop timeout or a second signal."""
        log.info("supervisor_stopping", signal=signal.Signals(self.stop_signal).name, attempt=self.num_starts)
        group.signal_leader(signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_timeout_s
        while group.proc.poll() is None and time.monotonic() < deadline and not self.is_forced:
            time.sleep(self.config.poll_interval_s)
        if group.proc.poll() is None:
            group.signal_group(signal.SIGKILL)
        else:
            group.signal_group(signal.SIGTERM)  # ranks rank 0 left behind
        if not group.wait_empty(self.config.kill_timeout_s):
            group.signal_group(signal.SIGKILL)
            group.wait_empty(60.0)
        log.info("group_stopped", attempt=self.num_starts, exit_code=group.proc.returncode)

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.stop_signal is None and time.monotonic() < deadline:
            time.sleep(min(self.config.poll_interval_s, max(0.0, deadline - time.monotonic())))
