"""In-process token buckets with the Redis script's semantics: the per-router fallback when Redis is down."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from ratelimit.limiter import REQUESTS, TOKENS, Decision, Limit, QuotaDecision


class LocalLimiter:
    """Token buckets per (key, bucket) in this process, on a monotonic clock (seconds; injectable for tests).

    Like `token_bucket.lua`: every bucket of a call is checked and all are debited only if all allow; a refund
    (negative cost) is capped at the burst; a full bucket is forgotten. Past `max_buckets`, the least recently
    debited half is dropped (they read as full again), so memory stays bounded under many keys.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_buckets: int = 100_000) -> None:
        self._clock = clock
        self._max_buckets = max_buckets
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # (key, bucket) -> (level, ts)

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, key: str, requests: Sequence[tuple[str, Limit, int]]) -> tuple[Decision, ...]:
        """Check every (bucket, limit, cost) of `key`; debit all only if all allow. One Decision per entry."""
        if any(cost < 0 for _, _, cost in requests):
            raise ValueError("acquire costs must be >= 0; use refund() to give units back")
        return self._charge(key, requests)

    def acquire_quota(self, key: str, rpm: Limit, tpm: Limit, tokens: int) -> QuotaDecision:
        """Charge one request and `tokens` reserved tokens to `key`, both or neither."""
        req, tok = self.acquire(key, [(REQUESTS, rpm, 1), (TOKENS, tpm, tokens)])
        return QuotaDecision(requests=req, tokens=tok)

    def debit(self, key: str, limit: Limit, amount: int, bucket: str = TOKENS) -> Decision:
        """Take `amount` units even when the bucket cannot pay (it goes into debt); see RateLimiter.debit."""
        if amount < 0:
            raise ValueError(f"debit amount must be >= 0, got {amount!r}")
        (decision,) = self._charge(key, [(bucket, limit, amount)], force=True)
        return decision

    def refund(self, key: str, limit: Limit, amount: int, bucket: str = TOKENS) -> Decision:
        """Give back `amount` unused units; the bucket never exceeds its burst."""
        if amount < 0:
            raise ValueError(f"refund amount must be >= 0, got {amount!r}")
        (decision,) = self._charge(key, [(bucket, limit, -amount)])
        return decision

    def mirror(self, key: str, bucket: str, limit: Limit, level: float) -> None:
        """Set a bucket of `key` to `level` now (at most the burst): the router keeps its local buckets where the
        shared Redis bucket stands (its share of it), so a fallback starts from there instead of from full."""
        self._buckets.pop((key, bucket), None)
        if level < limit.burst:
            self._buckets[(key, bucket)] = (level, self._clock())
            if len(self._buckets) > self._max_buckets:
                self._prune()

    def _charge(self, key: str, requests: Sequence[tuple[str, Limit, int]],
                force: bool = False) -> tuple[Decision, ...]:
        now = self._clock()
        levels = []
        for bucket, limit, _ in requests:
            level, ts = self._buckets.get((key, bucket), (float(limit.burst), now))
            levels.append(min(limit.burst, level + max(0.0, now - ts) * limit.rate_per_minute / 60.0))
        all_allowed = force or all(level >= cost for level, (_, _, cost) in zip(levels, requests, strict=True))
        out = []
        for level, (bucket, limit, cost) in zip(levels, requests, strict=True):
            allowed = level >= cost
            retry = 0.0 if allowed else math.inf if cost > limit.burst else (cost - level) / limit.rate_per_minute * 60
            if all_allowed:
                level = min(limit.burst, level - cost)
                if level >= limit.burst:
                    self._buckets.pop((key, bucket), None)
                else:
                    self._buckets.pop((key, bucket), None)  # re-insert at the end: dict order is age order
                    self._buckets[(key, bucket)] = (level, now)
            out.append(Decision(allowed=allowed, remaining=max(0, math.floor(level)), retry_after_s=retry,
                                reset_after_s=(limit.burst - level) / limit.rate_per_minute * 60, limit=limit.burst))
        if len(self._buckets) > self._max_buckets:
            self._prune()
        return tuple(out)

    def _prune(self) -> None:
        """Drop the oldest half of the buckets (oldest write first): a dropped bucket reads as full again."""
        for k in list(self._buckets)[: len(self._buckets) - self._max_buckets // 2]:
            del self._buckets[k]
