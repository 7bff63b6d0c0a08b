"""When the router may send a job to a worker before its admission is decided (dispatch ahead).

Admission is one Redis round trip; starting the worker call at the same time hides it from the client's time to
first token. The job's events wait in the router until the admission allows it; a denial cancels the worker call
within a scheduler step and nothing reaches the client. So that only requests that are all but certain to be
admitted are sent ahead — never a stranger's, never a throttled client's — the router dispatches ahead only for
a key it verified itself before (same id and secret: Authenticator.known) whose last rate-limit decision here left
room for the request. Each dispatch ahead spends that room locally until the next decision refreshes it."""

from __future__ import annotations

from ratelimit.limiter import QuotaDecision

_MAX_KEYS = 100_000


class Headroom:
    """Per key id, the requests and tokens its last rate-limit decision seen by this router left, less what was
    dispatched ahead since. Bounded: the least recently decided keys are forgotten first."""

    def __init__(self, max_keys: int = _MAX_KEYS) -> None:
        self.max_keys = max_keys
        self._room: dict[str, tuple[int, int]] = {}  # key id -> (requests, tokens)

    def saw(self, key_id: str, decision: QuotaDecision) -> None:
        """Record a decision (allowed or not; a denial leaves no room)."""
        room = (decision.requests.remaining, decision.tokens.remaining) if decision.allowed else (0, 0)
        self._room.pop(key_id, None)
        self._room[key_id] = room
        if len(self._room) > self.max_keys:
            self._room.pop(next(iter(self._room)))

    def take(self, key_id: str, tokens: int) -> bool:
        """True (and the room spent) when the last decision left room for one more request of `tokens`."""
        room = self._room.get(key_id)
        if room is None or room[0] < 1 or room[1] < tokens:
            return False
        self._room[key_id] = (room[0] - 1, room[1] - tokens)
        return True
