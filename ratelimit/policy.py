"""What the router does when Redis fails: fail open onto local buckets or fail closed, counted and logged."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from ratelimit.limiter import TOKENS, Decision, QuotaDecision, RateLimitBackendError, RateLimiter
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
    """Plain counters (exported to metrics later). `fallbacks` counts answers given by the local buckets."""

    backend_errors: int = 0
    fallbacks: int = 0
    unavailable: int = 0
    recoveries: int = 0


@dataclass(frozen=True)
class GuardedDecision(QuotaDecision):
    """A QuotaDecision plus `degraded`: True when the local buckets answered because Redis had failed."""

    degraded: bool = False


class GuardedLimiter:
    """The router's rate limiter: Redis first, with the failure policy applied when it raises.

    After a failure Redis is skipped for `cooldown_s` (answers come from the local buckets, or LimiterUnavailable
    under FAIL_CLOSED), then the next call tries it again; the first success ends the degraded state by itself.
    """

    def __init__(self, redis_limiter: RateLimiter, local_limiter: LocalLimiter | None = None,
                 policy: FailurePolicy = FailurePolicy.FAIL_OPEN, counters: LimiterCounters | None = None,
                 cooldown_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis_limiter
        self.local = local_limiter if local_limiter is not None else LocalLimiter()
        self.policy = policy
        self.counters = counters if counters is not None else LimiterCounters()
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failed_at: float | None = None

    @property
    def degraded(self) -> bool:
        """True from a Redis failure until the next Redis success."""
        return self._failed_at is not None

    async def acquire_quota(self, key: str, tier: Tier, tokens: int) -> GuardedDecision:
        """Charge one request and `tokens` to `key` under `tier`. Raises LimiterUnavailable under FAIL_CLOSED."""
        if self._redis_usable():
            try:
                d = await self.redis.acquire_quota(key, tier.requests, tier.tokens, tokens)
            except RateLimitBackendError as exc:
                self._failed(key, "acquire", exc)
            else:
                self._succeeded()
                return GuardedDecision(d.requests, d.tokens)
        if self.policy is FailurePolicy.FAIL_CLOSED:
            self.counters.unavailable += 1
            raise LimiterUnavailable("rate-limit backend unavailable")
        self.counters.fallbacks += 1
        d = self.local.acquire_quota(key, tier.requests, tier.tokens, tokens)
        return GuardedDecision(d.requests, d.tokens, degraded=True)

    async def acquire_quota_with(self, before, key: str, tier: Tier,
                                 tokens: int) -> tuple[object, GuardedDecision] | None:
        """acquire_quota with the Redis command `before` in the same round trip (RateLimiter.acquire_quota_with):
        returns (before's reply, decision), or None when Redis is skipped (cooldown) or fails — the caller then
        makes its calls one by one, which apply the failure policy. Charges nothing when it returns None."""
        if not self._redis_usable():
            return None
        try:
            reply, d = await self.redis.acquire_quota_with(before, key, tier.requests, tier.tokens, tokens)
        except RateLimitBackendError as exc:
            self._failed(key, "acquire", exc)
            return None
        self._succeeded()
        return reply, GuardedDecision(d.requests, d.tokens)

    async def refund_quota(self, key: str, tier: Tier, tokens: int) -> None:
        """Undo a whole admission by acquire_quota_with (one request and `tokens`) in Redis; best effort."""
        try:
            await self.redis.refund_quota(key, tier.requests, tier.tokens, tokens)
        except RateLimitBackendError as exc:
            self._failed(key, "refund", exc)

    async def refund(self, key: str, tier: Tier, amount: int, bucket: str = TOKENS) -> Decision | None:
        """Give back unused units. Best effort, never raises on a backend failure: the request already ran.

        Under FAIL_OPEN a failed refund goes to the local buckets; under FAIL_CLOSED it is dropped (None).
        """
        return await self._settle("refund", key, tier, amount, bucket)

    async def debit(self, key: str, tier: Tier, amount: int, bucket: str = TOKENS) -> Decision | None:
        """Take units used beyond a reservation, even into debt; best effort like refund()."""
        return await self._settle("debit", key, tier, amount, bucket)

    async def _settle(self, op: str, key: str, tier: Tier, amount: int, bucket: str) -> Decision | None:
        limit = tier.tokens if bucket == TOKENS else tier.requests
        if self._redis_usable():
            try:
                d = await getattr(self.redis, op)(key, limit, amount, bucket)
            except RateLimitBackendError as exc:
                self._failed(key, op, exc)
            else:
                self._succeeded()
                return d
        if self.policy is FailurePolicy.FAIL_CLOSED:
            return None
        self.counters.fallbacks += 1
        return getattr(self.local, op)(key, limit, amount, bucket)

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
