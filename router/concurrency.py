"""Per-key caps on what a key holds open on this router at once: calls in flight and Chat sessions."""

from __future__ import annotations

import math
from collections.abc import Callable

REQUESTS = "requests"  # Generate/GenerateStream calls and Chat turns in flight
SESSIONS = "sessions"  # open Chat streams


class Slot:
    """One unit held by a key; `release()` (idempotent) gives it back."""

    __slots__ = ("_counts", "_name", "_released")

    def __init__(self, counts: dict[tuple[str, str], int], name: tuple[str, str]) -> None:
        self._counts = counts
        self._name = name
        self._released = False
        counts[name] = counts.get(name, 0) + 1

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        left = self._counts[self._name] - 1
        if left:
            self._counts[self._name] = left
        else:
            del self._counts[self._name]  # only keys holding something take memory


class KeySlots:
    """Counts per (key id, kind) on this router. A tier's cap is for the whole cluster: each router enforces its
    share, the cap divided by the routers alive (`num_routers`, e.g. ratelimit.peers), rounded up, at least 1 —
    so N routers together admit at most about the cap, and a lone router the whole of it."""

    def __init__(self, num_routers: Callable[[], int] = lambda: 1) -> None:
        self._num_routers = num_routers
        self._counts: dict[tuple[str, str], int] = {}

    def limit(self, cap: int) -> int:
        """This router's share of a cluster-wide cap."""
        return max(1, math.ceil(cap / max(1, self._num_routers())))

    def held(self, key_id: str, kind: str) -> int:
        return self._counts.get((key_id, kind), 0)

    def try_hold(self, key_id: str, kind: str, cap: int) -> Slot | None:
        """A slot for `key_id`, or None when it already holds this router's share of `cap`."""
        if self.held(key_id, kind) >= self.limit(cap):
            return None
        return Slot(self._counts, (key_id, kind))
