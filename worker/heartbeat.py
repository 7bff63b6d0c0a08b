"""Per-rank heartbeat files: `DIR/rank{r}.heartbeat` holds the rank's PID; its mtime says it is working."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

MIN_INTERVAL_S = 0.2  # beat() writes at most this often; callers beat from their work loop, every step
_NAME = re.compile(r"rank(\d+)\.heartbeat")


def heartbeat_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / f"rank{rank}.heartbeat"


class Heartbeat:
    """Called from a rank's main work loop (never from a free-running thread), so a hung rank goes stale."""

    def __init__(self, run_dir: Path, rank: int, clock: Callable[[], float] = time.monotonic):
        self.clock = clock  # what the MIN_INTERVAL_S throttle counts in (tests pass their own)
        self.path = heartbeat_path(run_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(str(os.getpid()))
        tmp.replace(self.path)  # atomic: a reader never sees an empty file
        self._last = clock()

    def beat(self) -> None:
        now = self.clock()
        if now - self._last < MIN_INTERVAL_S:
            return
        self._last = now
        try:
            os.utime(self.path)
        except FileNotFoundError:  # removed under us (a supervisor cleaning up): write it again
            self.path.write_text(str(os.getpid()))


def read_heartbeats(run_dir: Path) -> dict[int, tuple[int, float]]:
    """rank -> (pid, mtime as time.time()) for every readable heartbeat file in run_dir."""
    beats: dict[int, tuple[int, float]] = {}
    try:
        entries = list(os.scandir(run_dir))
    except FileNotFoundError:
        return beats
    for entry in entries:
        match = _NAME.fullmatch(entry.name)
        if match is None:
            continue
        try:
            mtime = entry.stat().st_mtime
            pid = int(Path(entry.path).read_text().strip())
        except (OSError, ValueError):  # vanished or half-written: skip until the next read
            continue
        beats[int(match.group(1))] = (pid, mtime)
    return beats
