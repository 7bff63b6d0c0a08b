"""Restart policy: capped exponential backoff and crash-loop detection (pure; times are passed in)."""

from __future__ import annotations

from collections import deque


class Backoff:
    """initial_s, 2x, 4x, ... up to max_s; starts again at initial_s after a group served for stable_after_s."""

    def __init__(self, initial_s: float, max_s: float, stable_after_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.stable_after_s = stable_after_s
        self.num_failures = 0

    def next_delay(self, serving_s: float | None) -> float:
        """serving_s: how long the failed group was serving (None: it never served)."""
        if serving_s is not None and serving_s >= self.stable_after_s:
            self.num_failures = 0
        delay = min(self.initial_s * 2 ** self.num_failures, self.max_s)
        self.num_failures += 1
        return delay


class CrashLoop:
    """max_failures failures within window_s is a crash loop."""

    def __init__(self, max_failures: int, window_s: float) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.failure_times: deque[float] = deque()

    def record(self, now: float) -> bool:
        """Note a failure at monotonic time `now`; True if that makes a crash loop."""
        self.failure_times.append(now)
        while self.failure_times and now - self.failure_times[0] > self.window_s:
            self.failure_times.popleft()
        return len(self.failure_times) >= self.max_failures

    @property
    def num_recent(self) -> int:
        return len(self.failure_times)
