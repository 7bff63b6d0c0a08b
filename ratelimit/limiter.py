"""Token-bucket rate limits for API keys, checked atomically by one Lua script on Redis' own clock."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.maint_notifications import MaintNotificationsConfig

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


def connect(url: str, timeout_s: float = 0.25, connect_timeout_s: float | None = None,
            **kwargs) -> aioredis.Redis:
    """An asyncio Redis client whose commands give up after `timeout_s` (connecting: `connect_timeout_s`, default
    the same), so a dead Redis fails fast.

    A command that fails on a broken connection (ConnectionError: e.g. a pooled socket Redis closed when it
    restarted) is sent once more on a fresh one; a timed-out one is not (Redis may have run it). Pooled sockets are
    also checked for a close before each use (redis-py skips that check while its maintenance notifications are on,
    which this client does not use), so a stale one is replaced before anything is written to it."""
    return aioredis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s if connect_timeout_s is None
        else connect_timeout_s, retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        maint_notifications_config=MaintNotificationsConfig(enabled=False), **kwargs)


class RoundTripDeadline:
    """How long a limiter call may take: `factor` x the p99 of the last `window` successful round trips, kept
    within [floor_s, ceiling_s]. A busy but healthy host stretches every round trip; the deadline follows, so only
    a Redis that answers far slower than it recently did counts as failed."""

    def __init__(self, floor_s: float, ceiling_s: float | None = None, factor: float = 4.0,
                 window: int = 256) -> None:
        ceiling_s = floor_s if ceiling_s is None else ceiling_s
        if not 0 < floor_s <= ceiling_s:
            raise ValueError(f"need 0 < floor_s <= ceiling_s, got {floor_s!r}, {ceiling_s!r}")
        self.floor_s = floor_s
        self.ceiling_s = ceiling_s
        self.factor = factor
        self._samples: deque[float] = deque(maxlen=window)
        self._until_update = 0
        self.timeout_s = floor_s

    def timed_out(self) -> None:
        """A call ran past the deadline: double it (up to the ceiling). Latency that jumped above the deadline
        before any call could succeed would otherwise keep every call failing. It holds for the next 32 successes
        (enough for the new latency to show in the p99), then follows them again."""
        self.timeout_s = min(self.ceiling_s, self.timeout_s * 2)
        self._until_update = 32

    def observe(self, seconds: float) -> None:
        """One successful round trip; the deadline is recomputed every 32 of them (sorting is not per call)."""
        self._samples.append(seconds)
        self._until_update -= 1
        if self._until_update <= 0 and self.ceiling_s > self.floor_s:
            self._until_update = 32
            ordered = sorted(self._samples)
            p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
            self.timeout_s = min(self.ceiling_s, max(self.floor_s, self.factor * p99))


class RateLimiter:
    """Token buckets per API key in Redis hashes `{prefix}:{key}:{bucket}` (one hash tag, so one Cluster slot)."""

    def __init__(self, redis_client: aioredis.Redis, prefix: str = "rl", timeout_s: float = 0.25,
                 max_timeout_s: float | None = None) -> None:
        """Each call as a whole must finish within a deadline that adapts to recent round trips (RoundTripDeadline)
        between `timeout_s` and `max_timeout_s` (default: fixed at `timeout_s`), and within the client's socket
        timeout, which should be at least `max_timeout_s`."""
        self._redis = redis_client
        self._prefix = prefix
        self.deadline = RoundTripDeadline(timeout_s, max_timeout_s)
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

    async def acquire_quota(self, key: str, rpm: Limit, tpm: Limit, tokens: int,
                            abandoned: Callable[[bool], None] | None = None) -> QuotaDecision:
        """Charge one request and `tokens` reserved tokens to `key`, both or neither. `abandoned`: called with
        whether Redis charged them, should the caller be cancelled before the answer came (see _run)."""
        if tokens < 0:
            raise ValueError("acquire costs must be >= 0; use refund() to give units back")
        requests = [(REQUESTS, rpm, 1), (TOKENS, tpm, tokens)]
        _, raw = await self._run(*self._script_args(key, requests), abandoned=abandoned)
        req, tok = _decisions(raw, requests)
        return QuotaDecision(requests=req, tokens=tok)

    async def acquire_quota_with(self, before: Sequence, key: str, rpm: Limit, tpm: Limit, tokens: int,
                                 abandoned: Callable[[bool], None] | None = None) -> tuple[object, QuotaDecision]:
        """acquire_quota, with the Redis command `before` (e.g. an API-key lookup) sent in the same pipeline: one
        round trip for both. Returns `before`'s reply (an exception instance if that command alone failed) and the
        decision. A NOSCRIPT reply (Redis restarted or flushed its scripts) loads the script and sends both again."""
        if tokens < 0:
            raise ValueError("acquire costs must be >= 0; use refund() to give units back")
        requests = [(REQUESTS, rpm, 1), (TOKENS, tpm, tokens)]
        (reply,), raw = await self._run(*self._script_args(key, requests), before=(tuple(before),),
                                        abandoned=abandoned)
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

    async def _run(self, keys: list[str], args: list, before: Sequence[tuple] = (),
                   abandoned: Callable[[bool], None] | None = None) -> tuple[list, list]:
        """One round trip: the commands `before` (their replies returned as they are, an exception instance for a
        command Redis refused) and the script's EVALSHA, sent with whatever other decisions this event-loop pass
        issued (CommandBatcher). A NOSCRIPT reply (Redis restarted or flushed its scripts) sends them again after a
        SCRIPT LOAD, in the same batch: one more round trip, and callers that hit NOSCRIPT together share its
        connection rather than each opening one to load the script. `abandoned`: should the caller be cancelled
        (or time out) before the answer, it is called with whether the script charged everything it asked for, once
        Redis answers — with no task per call, which is what waiting for the answer on the caller's behalf costs."""
        evalsha = ("EVALSHA", self._sha, len(keys), *keys, *args)
        on_replies = None if abandoned is None else (lambda replies: abandoned(_all_allowed(replies[-1])))
        commands = (*before, evalsha)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(self.deadline.timeout_s):
                for attempt in range(2):
                    *replies, raw = await self._batcher.run(commands, on_replies)
                    if isinstance(raw, NoScriptError) and attempt == 0:
                        commands = (*before, ("SCRIPT", "LOAD", _SCRIPT), evalsha)
                        continue
                    if isinstance(raw, BaseException):
                        raise raw
                    self.deadline.observe(loop.time() - started)
                    return replies[:len(before)], raw
        except (RedisError, OSError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                self.deadline.timed_out()
            raise RateLimitBackendError(f"rate-limit backend failed: {type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")


def _all_allowed(raw: object) -> bool:
    """Whether a script reply (four values per bucket, the first 1 when that bucket allowed) charged every bucket."""
    return isinstance(raw, list) and len(raw) >= 4 and all(float(raw[i]) == 1.0 for i in range(0, len(raw), 4))


def _decisions(raw: list, requests: Sequence[tuple[str, Limit, int]]) -> tuple[Decision, ...]:
    """The script's flat reply (four values per bucket) as one Decision per (bucket, limit, cost)."""
    return tuple(_decision(raw[4 * i:4 * i + 4], limit) for i, (_, limit, _) in enumerate(requests))


def _decision(raw: list, limit: Limit) -> Decision:
    allowed, remaining, retry_ms, reset_ms = (float(v) for v in raw)
    return Decision(allowed=allowed == 1.0, remaining=max(0, math.floor(remaining)),
                    retry_after_s=math.inf if retry_ms < 0 else retry_ms / 1000.0,
                    reset_after_s=reset_ms / 1000.0, limit=limit.burst)
