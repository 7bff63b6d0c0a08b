"""API-key authentication from `authorization: Bearer <key>` metadata, with a per-peer failure limit."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import grpc
import structlog

from router.errors import PermissionDenied, RateLimited, Unauthenticated
from router.keys import ApiKeyStore, KeyRecord, parse_bearer

log = structlog.get_logger("router.auth")

FAILURE_WINDOW_S = 60.0
_MAX_PEERS = 10_000


class FailureCounter:
    """Auth failures per peer in a sliding window (in-process). Once a peer has `limit` failures in the window
    further attempts are refused without a key lookup until the oldest failure ages out."""

    def __init__(self, limit: int, window_s: float = FAILURE_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, peer: str) -> deque[float] | None:
        times = self._failures.get(peer)
        if times is None:
            return None
        cutoff = self._clock() - self.window_s
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._failures[peer]
            return None
        return times

    def blocked_for(self, peer: str) -> float:
        """Seconds until `peer` may try again; 0 when not blocked."""
        times = self._recent(peer)
        if times is None or len(times) < self.limit:
            return 0.0
        return max(0.0, times[0] + self.window_s - self._clock())

    def record(self, peer: str) -> None:
        if len(self._failures) >= _MAX_PEERS and peer not in self._failures:
            for p in list(self._failures)[: _MAX_PEERS // 10]:  # drop the oldest-inserted peers
                del self._failures[p]
        self._failures.setdefault(peer, deque()).append(self._clock())

    def clear(self, peer: str) -> None:
        self._failures.pop(peer, None)


def bearer_token(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return parse_bearer(value)
    return None


class Authenticator:
    """Maps request metadata to a KeyRecord, or raises Unauthenticated / RateLimited (too many failures)."""

    def __init__(self, store: ApiKeyStore, max_failures: int, failures: FailureCounter | None = None) -> None:
        self.store = store
        self.failures = failures if failures is not None else FailureCounter(max_failures)

    async def authenticate(self, context: grpc.aio.ServicerContext) -> KeyRecord:
        peer = context.peer() or "unknown"
        peer_host = peer.rsplit(":", 1)[0]
        wait = self.failures.blocked_for(peer_host)
        if wait > 0:
            log.warning("auth_blocked", peer=peer_host, retry_after_s=round(wait, 3))
            raise RateLimited("too many failed authentication attempts", wait,
                              (("peer", "authentication failures per minute"),))
        token = bearer_token(context)
        record = await self.store.authenticate(token) if token is not None else None
        if record is None:
            self.failures.record(peer_host)
            log.info("auth_failed", peer=peer_host, reason="missing" if token is None else "invalid")
            raise Unauthenticated("missing or invalid API key")
        return record


def check_model(record: KeyRecord, model: str) -> None:
    if not record.allows_model(model):
        raise PermissionDenied("this API key may not use the requested model")
