"""API-key authentication from `authorization: Bearer <key>` metadata, with a failure limit per (peer, key id)."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import grpc
import structlog
from redis.exceptions import RedisError

from common.log_throttle import Throttle
from router.errors import LimiterDown, PermissionDenied, RateLimited, Unauthenticated
from router.keys import ApiKeyStore, KeyRecord, parse_bearer, parse_key_id

log = structlog.get_logger("router.auth")
# Failed and refused attempts are logged at most once per event and interval (with the count suppressed since):
# whoever reaches the port must not be able to flood the logs. Their counters in router.metrics are exact.
_LOG = Throttle(10.0)

FAILURE_WINDOW_S = 60.0
_MAX_PEERS = 10_000
_MAX_VERIFIED = 100_000


class FailureCounter:
    """Auth failures per slot in a sliding window (in-process). Once a slot has `limit` failures in the window
    further attempts from it are refused without a key lookup until the oldest failure ages out. A slot is what
    Presented.failure_slot says: (peer, key id) for a well-formed key, the peer alone for anything else."""

    def __init__(self, limit: int, window_s: float = FAILURE_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._failures: dict[Hashable, deque[float]] = {}

    def _recent(self, peer: Hashable) -> deque[float] | None:
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

    def blocked_for(self, peer: Hashable) -> float:
        """Seconds until `peer` may try again; 0 when not blocked."""
        times = self._recent(peer)
        if times is None or len(times) < self.limit:
            return 0.0
        return max(0.0, times[0] + self.window_s - self._clock())

    def record(self, peer: Hashable) -> None:
        if len(self._failures) >= _MAX_PEERS and peer not in self._failures:
            for p in list(self._failures)[: _MAX_PEERS // 10]:  # drop the oldest-inserted peers
                del self._failures[p]
        self._failures.setdefault(peer, deque()).append(self._clock())

    def clear(self, peer: Hashable) -> None:
        self._failures.pop(peer, None)


def bearer_token(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return parse_bearer(value)
    return None


class LastKnownKeys:
    """Records of keys recently verified against Redis, used only while Redis cannot be reached.

    Keyed by a SHA-256 of the presented key (never the key itself), bounded LRU, each entry usable for `stale_s`
    after its last successful lookup. Redis stays the authority: every lookup that reaches it refreshes or drops
    the entry, so a revocation is seen at once whenever Redis is up."""

    def __init__(self, stale_s: float, max_entries: int = 50_000, clock: Callable[[], float] = time.monotonic):
        self.stale_s = stale_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[KeyRecord, float]] = OrderedDict()

    @staticmethod
    def _slot(presented: str) -> bytes:
        return hashlib.sha256(presented.encode()).digest()

    def remember(self, presented: str, record: KeyRecord | None) -> None:
        slot = self._slot(presented)
        if record is None:
            self._entries.pop(slot, None)
            return
        self._entries[slot] = (record, self._clock())
        self._entries.move_to_end(slot)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def recall(self, presented: str) -> KeyRecord | None:
        entry = self._entries.get(self._slot(presented))
        if entry is None or self._clock() - entry[1] > self.stale_s:
            return None
        return entry[0]


class Authenticator:
    """Maps request metadata to a KeyRecord, or raises Unauthenticated / RateLimited (too many failures) /
    LimiterDown (UNAVAILABLE: the key store failed and the key was not verified here recently).

    With `last_known` (the fail-open policy), a key verified against Redis in the last `stale_s` seconds keeps
    working while Redis is down; new keys cannot be verified until it returns."""

    def __init__(self, store: ApiKeyStore, max_failures: int, failures: FailureCounter | None = None,
                 last_known: LastKnownKeys | None = None) -> None:
        self.store = store
        self.failures = failures if failures is not None else FailureCounter(max_failures)
        self.last_known = last_known
        self.stale_hits = 0
        self.failure_counts: dict[str, int] = {"missing": 0, "invalid": 0, "blocked": 0}  # read by router.metrics
        self.backend_errors = 0  # key-store (Redis) failures, read by router.metrics
        # key id -> (tier, digest of the exact key, record), of keys verified here (see speculation and known)
        self._verified: dict[str, tuple[str, str, KeyRecord]] = {}

    async def authenticate(self, context: grpc.aio.ServicerContext) -> KeyRecord:
        presented = self.begin(context)
        return self.finish(presented, await self.lookup(presented))

    async def lookup(self, presented: Presented) -> KeyRecord | None:
        """The presented key's record from the key store (None: missing, malformed or invalid); see finish()."""
        return await self._lookup(presented) if presented.token is not None else None

    def begin(self, context: grpc.aio.ServicerContext) -> Presented:
        """The credentials of a call, or RateLimited when its failure slot (its peer and the key id it presents, or
        its peer alone without a well-formed key) has failed too often; no lookup yet. A key this router verified
        (same id and secret) is never refused for failures of others, not even of others presenting its id."""
        peer = context.peer() or "unknown"
        presented = Presented(peer.rsplit(":", 1)[0], bearer_token(context))
        wait = self.failures.blocked_for(presented.failure_slot)
        if wait > 0 and self.known(presented) is None:
            self.failure_counts["blocked"] += 1
            _LOG.warn(log, "auth_blocked", peer=presented.peer_host, key_id=presented.key_id,
                      retry_after_s=round(wait, 3))
            subject = "peer" if presented.key_id is None else f"peer+key:{presented.key_id}"
            raise RateLimited("too many failed authentication attempts", wait,
                              ((subject, "authentication failures per minute"),))
        return presented

    def speculation(self, presented: Presented) -> tuple[tuple[str, str], str, str] | None:
        """For a key this router verified before: (its lookup command, its key id, the tier it had), so the caller
        can send the lookup together with the rate-limit charge of that tier in one Redis round trip and check
        the answer with `verify_reply`. None for anything else (the caller authenticates first)."""
        if presented.token is None:
            return None
        key_id = parse_key_id(presented.token)
        seen = self._verified.get(key_id) if key_id is not None else None
        command = self.store.lookup_command(presented.token) if seen is not None else None
        return None if command is None else (command, key_id, seen[0])

    def known(self, presented: Presented) -> KeyRecord | None:
        """The record this router last verified for exactly the presented key (same id AND secret), or None. A
        hint only — the key may have been revoked since: the caller still verifies it (verify_reply)."""
        key_id = parse_key_id(presented.token) if presented.token is not None else None
        seen = self._verified.get(key_id) if key_id is not None else None
        if seen is None or not hmac.compare_digest(seen[1], self.digest(presented)):
            return None
        return seen[2]

    def digest(self, presented: Presented) -> str:
        """The key store's digest of the presented token (computed once per call)."""
        if presented.digest is None:
            presented.digest = self.store.digest(presented.token)
        return presented.digest

    def verify_reply(self, presented: Presented, reply: object) -> KeyRecord:
        """finish() for the reply of a lookup sent by the caller (see speculation)."""
        if isinstance(reply, BaseException):  # the pipelined lookup alone failed: treat as a key-store failure
            self.backend_errors += 1
            _LOG.warn(log, "key_store_unavailable", error=type(reply).__name__)
            raise LimiterDown("authentication backend unavailable")
        record = self.store.verify(presented.token, reply, self.digest(presented))
        if self.last_known is not None:
            self.last_known.remember(presented.token, record)
        return self.finish(presented, record)

    def finish(self, presented: Presented, record: KeyRecord | None) -> KeyRecord:
        if record is None:
            self.failures.record(presented.failure_slot)
            reason = "missing" if presented.token is None else "invalid"
            self.failure_counts[reason] += 1
            _LOG.log(log.info, "auth_failed", key=reason, peer=presented.peer_host, key_id=presented.key_id,
                     reason=reason)
            # forget the key only when this very key failed (revoked, deleted): a wrong secret for its id must not
            # evict it, or anyone who knows the id could get the valid key refused (begin) behind the same peer
            if self.known(presented) is not None:
                self._verified.pop(presented.key_id, None)
            raise Unauthenticated("missing or invalid API key")
        self._verified.pop(record.key_id, None)  # re-inserted last: the oldest-verified ids go first when full
        self._verified[record.key_id] = (record.tier, self.digest(presented), record)
        if len(self._verified) > _MAX_VERIFIED:
            self._verified.pop(next(iter(self._verified)))
        return record

    async def _lookup(self, presented: Presented) -> KeyRecord | None:
        token = presented.token
        try:
            record = await self.store.authenticate(token, self.digest(presented))
        except (RedisError, OSError, TimeoutError) as exc:
            self.backend_errors += 1
            stale = self.last_known.recall(token) if self.last_known is not None else None
            if stale is None:
                _LOG.warn(log, "key_store_unavailable", error=type(exc).__name__)
                raise LimiterDown("authentication backend unavailable") from exc
            self.stale_hits += 1
            log.debug("key_store_unavailable_using_last_known", key_id=stale.key_id, error=type(exc).__name__)
            return stale
        if self.last_known is not None:
            self.last_known.remember(token, record)
        return record


@dataclass(slots=True)
class Presented:
    """What a call presented: its peer host and bearer token (None when missing or malformed); the token's digest
    once computed (Authenticator.digest: once per call, however many checks need it)."""

    peer_host: str
    token: str | None
    digest: str | None = None

    @property
    def key_id(self) -> str | None:
        """The id inside a well-formed key (not yet verified), else None."""
        return parse_key_id(self.token) if self.token is not None else None

    @property
    def failure_slot(self) -> Hashable:
        """Where this attempt's failures count: (peer, key id) for a well-formed key, so valid keys behind the same
        NAT or ingress are not refused for a neighbour's failures; the peer alone for key-less or malformed ones."""
        key_id = self.key_id
        return self.peer_host if key_id is None else (self.peer_host, key_id)


def check_model(record: KeyRecord, model: str) -> None:
    if not record.allows_model(model):
        raise PermissionDenied("this API key may not use the requested model")
