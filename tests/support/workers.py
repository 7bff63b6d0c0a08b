"""Real worker processes on a tiny model, started in parallel, with their JSON stderr in files."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.support.logs import file_events
from worker.launch import WorkerProcess, start_worker

INTERNAL_TOKEN = "internal-token-for-tests-0123456789"  # what workers that require one are given


@dataclass
class RealWorker:
    process: WorkerProcess
    log_path: Path
    metrics_port: int | None = None

    @property
    def address(self) -> str:
        return self.process.address

    @property
    def proc(self):
        return self.process.proc

    def events(self, name: str | None = None) -> list[dict]:
        """Its stderr's JSON objects (all, or those of event `name`); lines cut short or not JSON are skipped."""
        return file_events(self.log_path, name)

    def stop(self) -> int:
        return self.process.stop()


def start_real_workers(model_dir: Path, logs: list[Path], *args: str, env: dict[str, str] | None = None,
                       metrics_ports: list[int] | None = None,
                       envs: list[dict[str, str]] | None = None) -> list[RealWorker]:
    """One `python -m worker --model model_dir *args` per log path (stderr there), started in parallel; with
    `metrics_ports`, worker i serves /metrics on metrics_ports[i]; with `envs`, worker i also gets envs[i]."""

    def start(i: int) -> RealWorker:
        extra = ("--metrics-port", str(metrics_ports[i])) if metrics_ports else ()
        with open(logs[i], "ab") as log:
            proc = start_worker(model_dir, *args, *extra, env={**(env or {}), **(envs[i] if envs else {})},
                                stderr=log)
        return RealWorker(proc, logs[i], metrics_ports[i] if metrics_ports else None)

    with ThreadPoolExecutor(len(logs)) as ex:
        futures = [ex.submit(start, i) for i in range(len(logs))]
    started, errors = [], []
    for f in futures:
        try:
            started.append(f.result())
        except Exception as exc:  # stop the ones that did start before reporting
            errors.append(exc)
    if errors:
        for w in started:
            w.stop()
        raise errors[0]
    return started


def start_workers(model_dir: Path, logs: list[Path], *args: str) -> list[WorkerProcess]:
    """start_real_workers, as bare WorkerProcess handles."""
    return [w.process for w in start_real_workers(model_dir, logs, *args)]
