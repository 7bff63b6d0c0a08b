"""A fake worker in a process of its own, for tests that kill -9 it: `python -m tests.support.fake_process
--port-file F --script JSON` (also `python -m tests.support.fake_worker ...`), one JSON line on stderr per job started
and ended; `FakeWorkerProcess` starts one, `Respawner` starts it again whenever it exits, as a supervisor would."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from common.internal_auth import INTERNAL_TOKEN_ENV
from tests.support.fake_model import JobRecord, Script
from tests.support.fake_worker import FakeWorker
from tests.support.logs import file_events
from tests.support.waits import wait_until

ROOT = Path(__file__).resolve().parents[2]


class FakeWorkerProcess:
    """`python -m tests.support.fake_worker` in a process of its own (kill -9 it like a real replica); its stderr,
    one JSON object per line, goes to `log_path`."""

    def __init__(self, log_path: Path, script: Script | None = None, *, port: int = 0,
                 internal_token: str | None = None, timeout_s: float = 30.0, exit_after_s: float | None = None,
                 ) -> None:
        """`exit_after_s`: the process exits by itself (status 2, as a crash) that long after it serves."""
        self.log_path = log_path
        self.script = script or Script()
        port_file = Path(tempfile.mkdtemp(prefix="fake-worker-")) / "port"
        env = {**os.environ, **({INTERNAL_TOKEN_ENV: internal_token} if internal_token else {})}
        extra = ["--exit-after", str(exit_after_s)] if exit_after_s is not None else []
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.fake_process", "--port", str(port),
                                          "--port-file", str(port_file), "--script", self.script.to_json(), *extra],
                                         cwd=ROOT, env=env, stderr=log)
        try:
            text = wait_until(lambda: port_file.exists() and port_file.read_text() or self.proc.poll() is not None,
                              "the fake worker process's port file", timeout_s)
            assert self.proc.poll() is None, f"the fake worker exited with {self.proc.returncode}"
            self.port = int(text)
        finally:
            with contextlib.suppress(OSError):
                port_file.unlink()
                port_file.parent.rmdir()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def events(self, name: str | None = None) -> list[dict]:
        return file_events(self.log_path, name)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


class Respawner:
    """What a supervisor does for a fake worker process: start it again on the same port whenever it exits, until
    stopped. Life n logs to `<base>-<n>.stderr`; `exit_codes` holds how each life ended."""

    def __init__(self, base: Path, script: Script, port: int = 0, **kwargs) -> None:
        self.base, self.script, self.kwargs = base, script, kwargs
        self.lives: list[FakeWorkerProcess] = []
        self.exit_codes: list[int] = []
        self._stop = threading.Event()
        self._spawn(port)
        self.port = self.lives[0].port
        self._thread = threading.Thread(target=self._watch, name="fake-respawner", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, port: int) -> None:
        self.lives.append(FakeWorkerProcess(self.base.with_name(f"{self.base.name}-{len(self.lives) + 1}.stderr"),
                                            self.script, port=port, **self.kwargs))

    def _watch(self) -> None:
        while not self._stop.is_set():
            code = self.lives[-1].proc.wait()
            if self._stop.is_set():
                return
            self.exit_codes.append(code)
            self._spawn(self.port)

    def events(self, name: str | None = None, life: int | None = None) -> list[dict]:
        """Events of one life (1-based), or of all."""
        lives = self.lives if life is None else [self.lives[life - 1]]
        return [e for p in list(lives) for e in p.events(name)]

    def stop(self) -> None:
        self._stop.set()
        for life in list(self.lives):
            life.stop()
        self._thread.join(10)
        for life in list(self.lives):  # (one the watcher may have started meanwhile)
            life.stop()


def _log_event(name: str, record: JobRecord) -> None:
    sys.stderr.write(json.dumps({"event": name, **record.summary()}) + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.fake_process")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--script", default="{}", help="a Script as JSON")
    parser.add_argument("--exit-after", type=float, default=None, help="exit with status 2 this long after serving")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    fake = FakeWorker(Script.from_json(args.script), port=args.port,
                      internal_token=os.environ.get(INTERNAL_TOKEN_ENV) or None, on_event=_log_event,
                      exit_process=True).start()
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(str(fake.port))
    tmp.rename(args.port_file)
    _log_event_plain("fake_worker_serving", port=fake.port, model=fake.script.model)
    if args.exit_after is not None and not stop.wait(args.exit_after):
        _log_event_plain("fake_worker_crashing")
        os._exit(2)
    while not stop.wait(1.0):  # (a plain wait() may not wake for the signal handler)
        pass
    fake.stop(grace_s=5)
    _log_event_plain("fake_worker_stopped")
    return 0


def _log_event_plain(name: str, **fields) -> None:
    sys.stderr.write(json.dumps({"event": name, **fields}) + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
