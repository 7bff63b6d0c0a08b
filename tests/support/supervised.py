"""`python -m worker.supervisor` around a real tiny worker, its JSON log in a file (supervisor tests and metrics)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.waits import wait_until

START_TIMEOUT_S = 180.0  # two shared CPU cores: a start is seconds, but never assert speed


def group_processes(pgid: int) -> list[str]:
    """Every process (zombies included) still in process group pgid, as 'pid state'."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            found.append(f"{stat.parent.name} {fields[0]}")
    return found


class Supervised:
    """`python -m worker.supervisor [options] -- --model tiny ...` with its log in a file."""

    def __init__(self, tmp_path: Path, model_dir: Path, options: list[str], worker_args: list[str] = (),
                 env: dict[str, str] | None = None, via_cli: bool = False):
        self.port_file = tmp_path / "port"
        self.log_path = tmp_path / "supervisor.log"
        entry = ["llamagrid", "worker", "--supervise"] if via_cli else ["worker.supervisor"]
        cmd = [sys.executable, "-m", *entry, "--port-file", str(self.port_file), "--backoff-initial", "0.2",
               *options, "--", "--model", str(model_dir), "--port", "0", "--num-threads", "1",
               "--kv-cache-tokens", "1024", "--log-level", "warning", *worker_args]
        with open(self.log_path, "wb") as log:
            # TMPDIR: run dirs of a SIGKILLed supervisor stay inside tmp_path
            self.proc = subprocess.Popen(cmd, stderr=log, env={**os.environ, "TMPDIR": str(tmp_path), **(env or {})})

    def events(self, name: str) -> list[dict]:
        found = []
        for line in self.log_path.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("component") == "supervisor" and event.get("event") == name:
                found.append(event)
        return found

    def wait_event(self, name: str, count: int = 1, timeout: float = START_TIMEOUT_S) -> dict:
        return wait_until(lambda: (e := self.events(name)) and len(e) >= count and e[count - 1],
                          f"{count} {name} event(s) of the supervisor", timeout)

    @property
    def port(self) -> int:
        return int(wait_until(lambda: self.port_file.exists() and self.port_file.read_text(),
                              "the supervisor's port file", START_TIMEOUT_S))

    def wait_serving(self, attempt: int) -> int:
        """The group of this attempt serves: its rank 0 PID (= its process group id)."""
        wait_until(lambda: any(e["attempt"] == attempt for e in self.events("group_serving")),
                   f"attempt {attempt} of the supervised group to serve", START_TIMEOUT_S)
        return self.events("group_started")[attempt - 1]["pids"][0]

    def log_tail(self) -> str:
        return self.log_path.read_text()[-3000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
