"""Why a rank group failed: one cause per failure, from rank 0's exit status or from the watcher."""

from __future__ import annotations

import signal
from dataclasses import dataclass

from worker.faults import OOM_EXIT_CODE

OOM = "oom"  # the engine's dedicated exit code after repeated torch.OutOfMemoryError
CRASH = "crash"  # any other non-zero status, a fatal signal, or a rank that died under rank 0
KILLED = "killed"  # SIGKILL (kill -9, the kernel's OOM killer)
HUNG = "hung"  # a heartbeat went stale, or the group did not serve within the start-up grace
EXIT = "exit"  # status 0 although nobody asked the group to stop


@dataclass(frozen=True, slots=True)
class Failure:
    cause: str
    rank: int
    exit_code: int | None = None
    signal: str | None = None
    heartbeat_age_s: float | None = None

    @property
    def needs_sigkill(self) -> bool:
        """The rest of the group is killed at once: a hung or killed group gets no chance to drain."""
        return self.cause in (KILLED, HUNG) or self.rank != 0


def classify_exit(returncode: int, rank: int = 0) -> Failure:
    """Popen.returncode (negative = killed by that signal) -> Failure."""
    if returncode < 0:
        sig = signal.Signals(-returncode)
        return Failure(KILLED if sig == signal.SIGKILL else CRASH, rank, signal=sig.name)
    if returncode == 0:
        return Failure(EXIT, rank, exit_code=0)
    if returncode == OOM_EXIT_CODE:
        return Failure(OOM, rank, exit_code=returncode)
    return Failure(CRASH, rank, exit_code=returncode)
