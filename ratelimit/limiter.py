"""Token-bucket rate limits for API keys, checked atomically by one Lua script on Redis' own clock."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from ratelimit.batching import CommandBatcher

_SCRIPT = (Path(__file__).parent / "token_bucket.lua").read_text()

REQUESTS = "req"
TOKENS = "tok"


class RateLimitBackendError(Exception):
    """Redis could not answer (down, timed out, or refused the script); the caller picks fail-open or fail-closed."""


@dataclass(frozen=True)
class Limit:
    """A bucket that holds `burst` units and refills `rate_per_minute` units per minute."""

    rate_per_minute: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.rate_per_minute > 0 and math.isfinite(self.rate_per_minute)):
            raise ValueError(f"rate_per_minute must be a positive finite number, got {self.rate_per_minute!r}")
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {self.burst!r}")

    @classmethod
    def per_second(cls, rate: float, burst: int) -> Limit:
        """A limit stated per second (handy in tests)."""
        return cls(rate * 60.0, burst)

    @property
    def rate_per_ms(self) -> float:
        return self.rate_per_minute / 60_000.0


@dataclass(frozen=True)
class Decision:
    """One bucket's answer.

    allowed: this bucket alone could pay the cost now. remaining: whole units left after the call (not debited when
    any bucket of the same call denied). retry_after_s: 0 when allowed, the wait until the cost fits, or `math.inf`
    when the cost exceeds the burst. reset_after_s: the wait until the bucket is full. limit: the bucket's burst.
    """

    allowed: bool
    remaining: int
    retry_after_s: float
    reset_after_s: float
    limit: int


@dataclass(frozen=True)
class QuotaDecision:
    """The answer for one API call: a requests-per-minute bucket and a tokens-per-minute bucket, debited together."""

    requests: Decision
    tokens: Decision

    @property
    def allowed(self) -> bool:
        return self.requests.allowed and self.tokens.allowed

    @property
    def retry_after_s(self) -> float:
        """The longest wait over the denied buckets; 0 when allowed."""
        return max((d.retry_after_s for d in (self.requests, self.tokens) if not d.allowed), default=0.0)


def connect(url: str, timeout_s: float = 0.05, **kwargs) -> aioredis.Redis:
    """An asyncio Redis client with short socket timeouts and no retries, so a dead Redis fails fast."""
    return aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                   retry=Retry(NoBackoff(), 0), retry_on_timeout=False, **kwargs)


class RateLimiter:
    """Token buckets per API key in Redis hashes `{prefix}:{key}:{bucket}` (one hash tag, so one Cluster slot)."""

    def __init__(self, redis_client: aioredis.Redis, prefix: str = "rl", timeout_s: float = 0.25) -> None:
        """`timeout_s` bounds each call as a whole, on top of the client's own socket timeouts."""
        self._redis = redis_client
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._sha = redis_client.register_script(_SCRIPT).sha
        self._batcher = CommandBatcher(redis_client)  # concurrent decisions share one write and one read

    def bucket_key(self, key: str, bucket: str) -> str:
        """The Redis key of one bucket, e.g. `rl:{tenant-a}:tok`; `key` must not contain braces."""
        if not key or "{" in key or "}" in key:
            raise ValueError(f"rate-limit key must be non-empty and free of braces, got {key!r}")
        return f"{self._prefix}:{{{key}}}:{bucket}"

    async def acquire(self, key: str, requests: Sequence[tuple[str, Limit, int]]) -> tuple[Decision, ...]:
        """Check every (bucket, limit, cost) of `key` atomically; debit all of them only if all allow.

        Returns one Decision per entry, in order. A denial is a return value; a Redis failure raises
        RateLimitBackendError.
        """
        if any(cost < 0 for _, _, cost in requests):
            raise ValueError("acquire costs must be >= 0; use refund() to give units back")
        return await self._charge(key, requests)

    async def acquire_quota(self, key: str, rpm: Limit, tpm: Limit, tokens: int) -> QuotaDecision:
        """Charge one request and `tokens` reserved tokens to `key`, both or neither."""
        req, tok = await self.acquire(key, [(REQUESTS, rpm, 1), (TOKENS, tpm, tokens)])
        return QuotaDecision(requests=req, tokens=tok)

    async def acquire_quota_with(self, before: Sequence, key: str, rpm: Limit, tpm: Limit,
                                 tokens: int) -> tuple[object, QuotaDecision]:
        """acquire_quota, with the Redis command `before` (e.g. an API-key lookup) sent in the same pipeline: one
        round trip for both. Returns `before`'s reply (an exception instance if that command alone failed) and the
        decision. A NOSCRIPT reply (Redis restarted or flushed its scripts) loads the script and sends both again."""
        if tokens < 0:
            raise ValueError("acquire costs must be >= 0; use refund() to give units back")
        requests = [(REQUESTS, rpm, 1), (TOKENS, tpm, tokens)]
        (reply,), raw = await self._run(*self._script_args(key, requests), before=(tuple(before),))
        req, tok = _decisions(raw, requests)
        return reply, QuotaDecision(requests=req, tokens=tok)

    async def refund_quota(self, key: str, rpm: Limit, tpm: Limit, tokens: int) -> QuotaDecision:
        """Undo a whole acquire_quota (one request and `tokens`), e.g. one admitted on a guess that proved wrong."""
        req, tok = await self._charge(key, [(REQUESTS, rpm, -1), (TOKENS, tpm, -tokens)])
        return QuotaDecision(requests=req, tokens=tok)

    async def debit(self, key: str, limit: Limit, amount: int, bucket: str = TOKENS) -> Decision:
        """Take `amount` units from a bucket of `key` even when it cannot pay (it goes below zero and later calls
        wait for the refill): usage found after the fact, e.g. tokens a request used beyond its reservation."""
        if amount < 0:
            raise ValueError(f"debit amount must be >= 0, got {amount!r}")
        (decision,) = await self._charge(key, [(bucket, limit, amount)], force=True)
        return decision

    async def refund(self, key: str, limit: Limit, amount: int, bucket: str = TOKENS) -> Decision:
        """Give back `amount` unused units to a bucket of `key`; the bucket never exceeds its burst."""
        if amount < 0:
            raise ValueError(f"refund amount must be >= 0, got {amount!r}")
        (decision,) = await self._charge(key, [(bucket, limit, -amount)])
        return decision

    def _script_args(self, key: str, requests: Sequence[tuple[str, Limit, int]],
                     force: bool = False) -> tuple[list[str], list]:
        keys, args = [], []
        for bucket, limit, cost in requests:
            keys.append(self.bucket_key(key, bucket))
            args += [repr(limit.rate_per_ms), limit.burst, cost]
        if force:
            args.append("1")
        return keys, args

    async def _charge(self, key: str, requests: Sequence[tuple[str, Limit, int]],
                      force: bool = False) -> tuple[Decision, ...]:
        _, raw = await self._run(*self._script_args(key, requests, force))
        return _decisions(raw, requests)

    async def _run(self, keys: list[str], args: list, before: Sequence[tuple] = ()) -> tuple[list, list]:
        """One round trip: the commands `before` (their replies returned as they are, an exception instance for a
        command Redis refused) and the script's EVALSHA, sent with whatever other decisions this event-loop pass
        issued (CommandBatcher). A NOSCRIPT reply (Redis restarted or flushed its scripts) loads the script and
        sends them again."""
        evalsha = ("EVALSHA", self._sha, len(keys), *keys, *args)
        try:
            async with asyncio.timeout(self._timeout_s):
                for attempt in range(2):
                    *replies, raw = await self._batcher.run((*before, evalsha))
                    if isinstance(raw, NoScriptError) and attempt == 0:
                        await self._redis.script_load(_SCRIPT)
                        continue
                    if isinstance(raw, BaseException):
                        raise raw
                    return replies, raw
        except (RedisError, OSError, TimeoutError) as exc:
            raise RateLimitBackendError(f"rate-limit backend failed: {type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")


def _decisions(raw: list, requests: Sequence[tuple[str, Limit, int]]) -> tuple[Decision, ...]:
    """The script's flat reply (four values per bucket) as one Decision per (bucket, limit, cost)."""
    return tuple(_decision(raw[4 * i:4 * i + 4], limit) for i, (_, limit, _) in enumerate(requests))


def _decision(raw: list, limit: Limit) -> Decision:
    allowed, remaining, retry_ms, reset_ms = (float(v) for v in raw)
    return Decision(allowed=allowed == 1.0, remaining=max(0, math.floor(remaining)),
                    retry_after_s=math.inf if retry_ms < 0 else retry_ms / 1000.0,
                    reset_after_s=reset_ms / 1000.0, limit=limit.burst)
