"""What the router does when Redis fails: fail open onto local buckets or fail closed, counted and logged."""

from __future__ import annotations

import asyncio
import enum
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from ratelimit.limiter import REQUESTS, TOKENS, Decision, Limit, QuotaDecision, RateLimitBackendError, RateLimiter
from ratelimit.local import LocalLimiter
from ratelimit.tiers import Tier

log = structlog.get_logger("ratelimit.policy")


class FailurePolicy(enum.Enum):
    """FAIL_OPEN: keep serving under per-router local buckets. FAIL_CLOSED: refuse with UNAVAILABLE."""

    FAIL_OPEN = "fail-open"
    FAIL_CLOSED = "fail-closed"


class LimiterUnavailable(Exception):
    """Redis failed under FAIL_CLOSED; the router answers UNAVAILABLE."""


@dataclass
class LimiterCounters:
    """Plain counters (exported to metrics later). `fallbacks` counts answers given by the local buckets;
    `replayed` the local charges (one per key and bucket) written back to Redis after it recovered."""

    backend_errors: int = 0
    fallbacks: int = 0
    unavailable: int = 0
    recoveries: int = 0
    replayed: int = 0


@dataclass(frozen=True)
class GuardedDecision(QuotaDecision):
    """A QuotaDecision plus `degraded`: True when the local buckets answered because Redis had failed."""

    degraded: bool = False


@functools.lru_cache(maxsize=1024)
def share_of(limit: Limit, share: float) -> Limit:
    """`limit` with its rate and burst scaled by `share` (a burst of at least 1, so a key is never shut out)."""
    if share >= 1.0:
        return limit
    return Limit(limit.rate_per_minute * share, max(1, math.floor(limit.burst * share)))


class GuardedLimiter:
    """The router's rate limiter: Redis first, with the failure policy applied when it raises.

    After a failure Redis is skipped for `cooldown_s` (answers come from the local buckets, or LimiterUnavailable
    under FAIL_CLOSED), then the next call tries it again; the first success ends the degraded state by itself.

    The local buckets hold this router's share of each tier (`fallback_share`, else 1 / `num_routers()`, the routers
    alive as ratelimit.peers counts them), so N routers falling back together admit about one tier, not N. Every
    Redis answer sets the key's local buckets to that share of what Redis said is left, so a fallback starts where
    the shared bucket stood; and what the local buckets charged is written back to Redis when it recovers (at most
    a local burst per key and bucket: Redis refilled meanwhile, up to its burst), so the outage is not paid twice.
    """

    def __init__(self, redis_limiter: RateLimiter, local_limiter: LocalLimiter | None = None,
                 policy: FailurePolicy = FailurePolicy.FAIL_OPEN, counters: LimiterCounters | None = None,
                 cooldown_s: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 num_routers: Callable[[], int] = lambda: 1, fallback_share: float | None = None,
                 max_owed: int = 100_000) -> None:
        if fallback_share is not None and not 0 < fallback_share <= 1:
            raise ValueError(f"fallback_share must be in (0, 1], got {fallback_share!r}")
        self.redis = redis_limiter
        self.local = local_limiter if local_limiter is not None else LocalLimiter()
        self.policy = policy
        self.counters = counters if counters is not None else LimiterCounters()
        self.cooldown_s = cooldown_s
        self.num_routers = num_routers
        self.fallback_share = fallback_share
        self._clock = clock
        self._failed_at: float | None = None
        self._max_owed = max_owed
        self._owed: dict[tuple[str, str], tuple[Limit, int]] = {}  # (key, bucket) -> (tier limit, units)
        self._replays: set[asyncio.Task] = set()

    @property
    def degraded(self) -> bool:
        """True from a Redis failure until the next Redis success."""
        return self._failed_at is not None

    def local_share(self) -> float:
        """The fraction of a tier the local buckets grant now: `fallback_share`, else 1 / routers alive."""
        if self.fallback_share is not None:
            return self.fallback_share
        return 1.0 / max(1, self.num_routers())

    async def acquire_quota(self, key: str, tier: Tier, tokens: int,
                            abandoned: Callable[[bool], None] | None = None) -> GuardedDecision:
        """Charge one request and `tokens` to `key` under `tier`. Raises LimiterUnavailable under FAIL_CLOSED.
        `abandoned`: see RateLimiter.acquire_quota."""
        if self._redis_usable():
            try:
                d = await self.redis.acquire_quota(key, tier.requests, tier.tokens, tokens, abandoned)
            except RateLimitBackendError as exc:
                self._failed(key, "acquire", exc)
            else:
                self._succeeded()
                self._mirror(key, tier, d)
                return GuardedDecision(d.requests, d.tokens)
        if self.policy is FailurePolicy.FAIL_CLOSED:
            self.counters.unavailable += 1
            raise LimiterUnavailable("rate-limit backend unavailable")
        self.counters.fallbacks += 1
        share = self.local_share()
        d = self.local.acquire_quota(key, share_of(tier.requests, share), share_of(tier.tokens, share), tokens)
        if d.allowed:
            self._owe(key, REQUESTS, tier.requests, 1)
            self._owe(key, TOKENS, tier.tokens, tokens)
        return GuardedDecision(d.requests, d.tokens, degraded=True)

    async def acquire_quota_with(self, before, key: str, tier: Tier, tokens: int,
                                 abandoned: Callable[[bool], None] | None = None,
                                 ) -> tuple[object, GuardedDecision] | None:
        """acquire_quota with the Redis command `before` in the same round trip (RateLimiter.acquire_quota_with):
        returns (before's reply, decision), or None when Redis is skipped (cooldown) or fails — the caller then
        makes its calls one by one, which apply the failure policy. Charges nothing when it returns None."""
        if not self._redis_usable():
            return None
        try:
            reply, d = await self.redis.acquire_quota_with(before, key, tier.requests, tier.tokens, tokens,
                                                           abandoned)
        except RateLimitBackendError as exc:
            self._failed(key, "acquire", exc)
            return None
        self._succeeded()
        self._mirror(key, tier, d)
        return reply, GuardedDecision(d.requests, d.tokens)

    async def refund_quota(self, key: str, tier: Tier, tokens: int) -> None:
        """Undo a whole admission by acquire_quota_with (one request and `tokens`) in Redis; best effort."""
        try:
            d = await self.redis.refund_quota(key, tier.requests, tier.tokens, tokens)
        except RateLimitBackendError as exc:
            self._failed(key, "refund", exc)
        else:
            self._mirror(key, tier, d)

    async def refund(self, key: str, tier: Tier, amount: int, bucket: str = TOKENS) -> Decision | None:
        """Give back unused units. Best effort, never raises on a backend failure: the request already ran.

        Under FAIL_OPEN a failed refund goes to the local buckets; under FAIL_CLOSED it is dropped (None).
        """
        return await self._settle("refund", key, tier, amount, bucket)

    async def debit(self, key: str, tier: Tier, amount: int, bucket: str = TOKENS) -> Decision | None:
        """Take units used beyond a reservation, even into debt; best effort like refund()."""
        return await self._settle("debit", key, tier, amount, bucket)

    async def close(self) -> None:
        """Wait for write-backs to Redis still running (the router is stopping; each is bounded by its timeout)."""
        if self._replays:
            await asyncio.gather(*self._replays, return_exceptions=True)

    async def _settle(self, op: str, key: str, tier: Tier, amount: int, bucket: str) -> Decision | None:
        limit = tier.tokens if bucket == TOKENS else tier.requests
        if self._redis_usable():
            try:
                d = await getattr(self.redis, op)(key, limit, amount, bucket)
            except RateLimitBackendError as exc:
                self._failed(key, op, exc)
            else:
                self._succeeded()
                share = self.local_share()
                self.local.mirror(key, bucket, share_of(limit, share), d.remaining * share)
                return d
        if self.policy is FailurePolicy.FAIL_CLOSED:
            return None
        self.counters.fallbacks += 1
        self._owe(key, bucket, limit, amount if op == "debit" else -amount)
        return getattr(self.local, op)(key, share_of(limit, self.local_share()), amount, bucket)

    def _mirror(self, key: str, tier: Tier, d: QuotaDecision) -> None:
        share = self.local_share()
        self.local.mirror(key, REQUESTS, share_of(tier.requests, share), d.requests.remaining * share)
        self.local.mirror(key, TOKENS, share_of(tier.tokens, share), d.tokens.remaining * share)

    def _owe(self, key: str, bucket: str, limit: Limit, units: int) -> None:
        """Remember units the local buckets charged (negative: refunded), to write back when Redis recovers."""
        owed = self._owed.get((key, bucket))
        if owed is None and (units <= 0 or len(self._owed) >= self._max_owed):
            return
        self._owed[(key, bucket)] = (limit, max(0, (owed[1] if owed else 0) + units))

    async def _replay(self, owed: dict[tuple[str, str], tuple[Limit, int]]) -> None:
        """Debit into Redis what the local buckets charged during the outage, at most a local burst per bucket:
        the shared bucket refilled while Redis was away (up to its burst), and each router replays its share."""
        share = self.local_share()
        writes = [(key, bucket, limit, min(units, share_of(limit, share).burst))
                  for (key, bucket), (limit, units) in owed.items() if units > 0]
        results = await asyncio.gather(*(self.redis.debit(key, limit, units, bucket)
                                         for key, bucket, limit, units in writes), return_exceptions=True)
        failed = sum(isinstance(r, BaseException) for r in results)
        self.counters.replayed += len(results) - failed
        log.info("ratelimit_local_charges_replayed", buckets=len(results) - failed, failed=failed,
                 units=sum(w[3] for w, r in zip(writes, results, strict=True) if not isinstance(r, BaseException)))

    def _redis_usable(self) -> bool:
        return self._failed_at is None or self._clock() - self._failed_at >= self.cooldown_s

    def _failed(self, key: str, op: str, exc: RateLimitBackendError) -> None:
        self.counters.backend_errors += 1
        if self._failed_at is None:
            log.warning("ratelimit_backend_down", key_id=key, op=op, policy=self.policy.value, error=str(exc))
        else:
            log.debug("ratelimit_backend_still_down", key_id=key, op=op, error=str(exc))
        self._failed_at = self._clock()

    def _succeeded(self) -> None:
        if self._failed_at is not None:
            self._failed_at = None
            self.counters.recoveries += 1
            log.info("ratelimit_backend_recovered")
            if self._owed:
                owed, self._owed = self._owed, {}
                task = asyncio.get_running_loop().create_task(self._replay(owed))
                self._replays.add(task)
                task.add_done_callback(self._replays.discard)
