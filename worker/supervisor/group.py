"""One start of a replica: rank 0 in its own process group, the heartbeat files of every rank, stop and reap."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from worker.faults import START_ENV
from worker.heartbeat import read_heartbeats

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def become_subreaper() -> None:
    """Ranks orphaned by a dead rank 0 become our children (not init's), so we reap them too."""
    if _libc is not None:
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _die_with(parent_pid: int):
    """A preexec_fn: the child is SIGKILLed when the supervisor dies (even by SIGKILL)."""

    def preexec() -> None:
        if _libc is not None:
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def is_alive(pid: int, pgid: int) -> bool:
    """Running (not a zombie) and still in our process group (so a reused PID does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back to a signal 0 probe
        try:
            return os.getpgid(pid) == pgid
        except ProcessLookupError:
            return False
    state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
    return state not in ("Z", "X", "x") and int(pgrp) == pgid


@dataclass
class SupervisedGroup:
    """A replica's rank group as its supervisor sees it: rank 0's process (leading the process group every rank
    belongs to) and the heartbeat files of every rank in run_dir."""

    proc: subprocess.Popen
    run_dir: Path
    num_ranks: int
    started_at: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, cmd: list[str], run_dir: Path, num_ranks: int, attempt: int = 1) -> SupervisedGroup:
        """Start rank 0 of the group (it starts the others) in its own session; `attempt` (1, 2, ...) is passed as
        LLAMAGRID_GROUP_START so a test fault can be armed for one start only (worker.faults)."""
        run_dir.mkdir(parents=True, exist_ok=False)
        env = {**os.environ, START_ENV: str(attempt)}
        proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with(os.getpid()), env=env)
        return cls(proc, run_dir, num_ranks)

    @property
    def pgid(self) -> int:
        return self.proc.pid  # start_new_session: rank 0 leads its own group

    @property
    def port_file(self) -> Path:
        return self.run_dir / "port"

    def is_serving(self) -> bool:
        return self.port_file.exists()

    def heartbeats(self) -> dict[int, tuple[int, float]]:
        return read_heartbeats(self.run_dir)

    def pids(self) -> dict[int, int]:
        """rank -> pid, for the ranks known so far (rank 0 always)."""
        return {0: self.proc.pid} | {r: pid for r, (pid, _) in self.heartbeats().items() if r != 0}

    def dead_ranks(self) -> list[int]:
        """Ranks other than 0 whose process is gone (rank 0's exit is seen by poll())."""
        return sorted(r for r, (pid, _) in self.heartbeats().items() if r != 0 and not is_alive(pid, self.pgid))

    def stale_ranks(self, timeout_s: float, since: float) -> dict[int, float]:
        """rank -> seconds silent, for ranks silent for over timeout_s; silence counts from `since` at the earliest
        (when the group began serving: a rank may not beat while it loads), so a missing file is stale too."""
        now = time.time()
        beats = self.heartbeats()
        ages = {r: now - max(beats[r][1] if r in beats else since, since) for r in range(self.num_ranks)}
        return {r: round(age, 2) for r, age in ages.items() if age > timeout_s}

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)

    def signal_leader(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def is_empty(self) -> bool:
        """Reap what we can; True once no process of the group is left."""
        if self.proc.poll() is None:
            return False
        while True:  # ranks reparented to us (we are their subreaper) once rank 0 died
            try:
                pid, _ = os.waitpid(-self.pgid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return True
        return False

    def wait_empty(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.is_empty():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True
