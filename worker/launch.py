"""Start a worker as a child process and wait until it serves (used by the CLI, tests and benchmarks)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM (a server drains), then SIGKILL after `timeout`; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class WorkerProcess:
    proc: subprocess.Popen
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (drain), then SIGKILL after timeout; returns the exit code."""
        return stop_process(self.proc, timeout)


def start_worker(model_dir: Path, *args: str, port: int = 0, timeout: float = 300.0,
                 env: dict[str, str] | None = None, stderr=None) -> WorkerProcess:
    """Run `python -m worker --model model_dir --port port *args`; return once it is SERVING."""
    port_file = Path(tempfile.mkdtemp(prefix="llamagrid-")) / "port"
    cmd = [sys.executable, "-m", "worker", "--model", str(model_dir), "--port", str(port),
           "--port-file", str(port_file), *args]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stderr=stderr)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.exists():
            port = int(port_file.read_text())
            shutil.rmtree(port_file.parent, ignore_errors=True)
            return WorkerProcess(proc, port)
        if proc.poll() is not None:
            shutil.rmtree(port_file.parent, ignore_errors=True)
            raise RuntimeError(f"worker exited with code {proc.returncode} during start-up")
        time.sleep(0.05)
    proc.kill()
    shutil.rmtree(port_file.parent, ignore_errors=True)
    raise RuntimeError(f"worker did not serve within {timeout} s")
