"""The bounded fail-open fallback: local buckets hold a router's share of a tier, start where Redis last
stood, and what they admitted is written back to Redis on recovery; the Redis deadline follows observed round
trips; per-key concurrency caps are split among routers. Pure logic: a fake Redis limiter and an injected clock."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from ratelimit.limiter import (
    REQUESTS,
    TOKENS,
    Decision,
    Limit,
    QuotaDecision,
    RateLimitBackendError,
    RateLimiter,
    RoundTripDeadline,
)
from ratelimit.local import LocalLimiter
from ratelimit.policy import FailurePolicy, GuardedLimiter, LimiterUnavailable, share_of
from ratelimit.tiers import Tier
from router.concurrency import REQUESTS as CALLS
from router.concurrency import SESSIONS, KeySlots

RPM = Limit(60, 10)  # 1 request/s, 10 at once
TPM = Limit(6000, 1000)  # 100 tokens/s, 1000 at once
TIER = Tier("t", RPM, TPM)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeRedis:
    """Stands in for RateLimiter: fails while `down` (`debit_down`: only debits fail); answers allowed with
    `left[bucket]` units remaining (default: the bucket's burst, i.e. full) and records every debit."""

    def __init__(self) -> None:
        self.down = False
        self.debit_down = False
        self.left: dict[str, int] = {}
        self.debits: list[tuple[str, str, Limit, int]] = []

    def _check(self) -> None:
        if self.down:
            raise RateLimitBackendError("rate-limit backend failed: ConnectionError: refused")

    def _decision(self, bucket: str, limit: Limit) -> Decision:
        return Decision(True, self.left.get(bucket, limit.burst), 0.0, 0.0, limit.burst)

    async def acquire_quota(self, key, rpm, tpm, tokens, abandoned=None):
        self._check()
        return QuotaDecision(self._decision(REQUESTS, rpm), self._decision(TOKENS, tpm))

    async def refund(self, key, limit, amount, bucket=TOKENS):
        self._check()
        return self._decision(bucket, limit)

    async def debit(self, key, limit, amount, bucket=TOKENS):
        self._check()
        if self.debit_down:
            raise RateLimitBackendError("rate-limit backend failed: TimeoutError")
        self.debits.append((key, bucket, limit, amount))
        return self._decision(bucket, limit)


def _guarded(routers: list[int] | None = None, **kwargs) -> tuple[GuardedLimiter, FakeRedis, Clock]:
    """A fail-open GuardedLimiter over FakeRedis; `routers[0]` is the live-router count it reads (default 1)."""
    redis, clock = FakeRedis(), Clock()
    routers = routers if routers is not None else [1]
    g = GuardedLimiter(redis, LocalLimiter(clock), FailurePolicy.FAIL_OPEN, cooldown_s=1.0, clock=clock,
                       num_routers=lambda: routers[0], **kwargs)
    return g, redis, clock


async def _admitted(g: GuardedLimiter, key: str, tokens: int = 10, attempts: int = 50) -> int:
    """Admissions of `key` out of `attempts` calls made at once (no time passes)."""
    n = 0
    for _ in range(attempts):
        n += (await g.acquire_quota(key, TIER, tokens)).allowed
    return n


# --- the share of a tier -------------------------------------------------------------------------------------------


def test_share_of_scales_rate_and_burst_and_never_shuts_a_key_out():
    assert share_of(RPM, 1.0) is RPM
    assert share_of(RPM, 0.5) == Limit(30, 5)
    assert share_of(Limit(60, 5), 0.5) == Limit(30, 2)  # the burst rounds down...
    assert share_of(Limit(60, 1), 0.01) == Limit(0.6, 1)  # ...but never below one unit


def test_local_buckets_hold_one_over_the_routers_alive():
    async def main():
        routers = [2]
        g, redis, _ = _guarded(routers)
        redis.down = True  # down from the start: nothing mirrored, each local bucket starts full (at its share)
        assert g.local_share() == 0.5
        assert await _admitted(g, "a") == 5  # half of a burst of 10
        routers[0] = 4
        assert await _admitted(g, "b") == 2  # a quarter: 2.5 rounds down
        routers[0] = 1
        assert await _admitted(g, "c") == 10  # a lone router: the whole tier
        routers[0] = 0  # a bogus count reads as one router
        assert g.local_share() == 1.0
        assert g.counters.fallbacks == 150 and g.counters.backend_errors == 1

    asyncio.run(main())


def test_fallback_share_overrides_the_router_count():
    async def main():
        g, redis, _ = _guarded([2], fallback_share=0.3)
        redis.down = True
        assert g.local_share() == 0.3
        assert await _admitted(g, "a") == 3

    asyncio.run(main())
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="fallback_share"):
            GuardedLimiter(FakeRedis(), fallback_share=bad)


def test_local_bucket_refills_at_the_share_of_the_rate():
    async def main():
        g, redis, clock = _guarded([2])
        redis.down = True
        assert await _admitted(g, "a") == 5
        clock.t += 4.0  # 0.5 request/s here: two more
        assert await _admitted(g, "a") == 2

    asyncio.run(main())


# --- mirroring Redis -----------------------------------------------------------------------------------------------


def test_a_fallback_starts_where_redis_stood():
    async def main():
        g, redis, clock = _guarded([2])
        redis.left = {REQUESTS: 4, TOKENS: 500}
        assert not (await g.acquire_quota("a", TIER, 10)).degraded  # Redis: 4 requests left of 10
        redis.down = True
        d = await g.acquire_quota("a", TIER, 10)  # this router's half of what Redis had: 2 requests, 250 tokens
        assert d.allowed and d.degraded and d.requests.remaining == 1 and d.tokens.remaining == 240
        assert await _admitted(g, "a") == 1
        clock.t += 2.0  # refills at half the rate
        assert await _admitted(g, "a") == 1
        # a bucket Redis said was full is forgotten: it reads full (at the share) again
        redis.down, redis.left = False, {}
        clock.t += 1.0  # cool-down over
        assert not (await g.acquire_quota("b", TIER, 10)).degraded
        await g.close()  # (the write-back of what "a" was charged here)
        redis.down = True
        clock.t += 1.0
        assert await _admitted(g, "b") == 5

    asyncio.run(main())


def test_a_fallback_is_short_of_tokens_where_redis_was():
    async def main():
        g, redis, _ = _guarded([2])
        redis.left = {REQUESTS: 10, TOKENS: 300}
        await g.acquire_quota("a", TIER, 10)
        redis.down = True
        assert (await g.acquire_quota("a", TIER, 100)).allowed  # 150 tokens here
        d = await g.acquire_quota("a", TIER, 100)
        assert not d.allowed and not d.tokens.allowed and d.requests.allowed

    asyncio.run(main())


def test_refunds_and_debits_mirror_too():
    async def main():
        g, redis, _ = _guarded([2])
        redis.left = {TOKENS: 100}
        assert (await g.refund("a", TIER, 5)).remaining == 100  # Redis answered: the local bucket holds 50
        redis.down = True
        assert (await g.acquire_quota("a", TIER, 40)).allowed
        assert not (await g.acquire_quota("a", TIER, 40)).allowed

    asyncio.run(main())


def test_local_mirror_sets_the_level_and_forgets_full_buckets():
    clock = Clock()
    lim = LocalLimiter(clock)
    lim.mirror("k", REQUESTS, RPM, 2.5)
    assert len(lim) == 1
    assert lim.acquire("k", [(REQUESTS, RPM, 2)])[0].remaining == 0  # 0.5 left
    clock.t += 0.5  # 1/s: 1.0 now
    assert lim.acquire("k", [(REQUESTS, RPM, 1)])[0].allowed
    lim.mirror("k", REQUESTS, RPM, 10)  # full: nothing to remember
    assert len(lim) == 0
    assert lim.acquire("k", [(REQUESTS, RPM, 10)])[0].allowed
    lim = LocalLimiter(clock, max_buckets=4)
    for i in range(20):
        lim.mirror(f"k{i}", REQUESTS, RPM, 1)
    assert len(lim) <= 4


# --- writing local charges back to Redis ---------------------------------------------------------------------------


def test_local_charges_are_replayed_on_recovery_at_most_a_local_burst():
    async def main():
        g, redis, clock = _guarded([2])
        redis.down = True
        assert await _admitted(g, "a", tokens=10) == 5
        clock.t += 10.0  # the local bucket refills (0.5/s, up to its burst of 5)
        assert await _admitted(g, "a", tokens=10) == 5
        assert await _admitted(g, "b", tokens=7) == 5
        assert redis.debits == []
        redis.down = False
        clock.t += 1.0  # cool-down over
        assert not (await g.acquire_quota("c", TIER, 1)).degraded  # recovery starts the write-back
        await g.close()
        assert sorted((k, b, n) for k, b, _, n in redis.debits) == [
            ("a", REQUESTS, 5),  # 10 admitted here, capped at this router's burst: Redis refilled meanwhile
            ("a", TOKENS, 100),
            ("b", REQUESTS, 5),
            ("b", TOKENS, 35),
        ]
        assert all(limit == (RPM if b == REQUESTS else TPM) for _, b, limit, _ in redis.debits)  # the tier's limits
        assert g.counters.replayed == 4 and g.counters.recoveries == 1
        redis.debits.clear()
        redis.down = True  # a second outage owes only its own charges
        clock.t += 10.0
        assert await _admitted(g, "a", tokens=10, attempts=1) == 1
        redis.down = False
        clock.t += 1.0
        await g.acquire_quota("c", TIER, 1)
        await g.close()
        assert sorted((k, b, n) for k, b, _, n in redis.debits) == [("a", REQUESTS, 1), ("a", TOKENS, 10)]

    asyncio.run(main())


def test_local_refunds_and_debits_adjust_what_is_replayed():
    async def main():
        g, redis, clock = _guarded()
        redis.down = True
        assert await _admitted(g, "a", tokens=100, attempts=2) == 2
        await g.refund("a", TIER, 50)  # unused tokens given back locally
        await g.debit("a", TIER, 30)  # tokens used beyond a reservation
        await g.refund("z", TIER, 50)  # nothing owed for z: nothing to write back
        assert await _admitted(g, "d", tokens=5, attempts=1) == 1
        await g.refund("d", TIER, 10)  # never below zero: d owes no tokens
        redis.down = False
        clock.t += 1.0
        await g.acquire_quota("c", TIER, 1)
        await g.close()
        assert sorted((k, b, n) for k, b, _, n in redis.debits) == [
            ("a", REQUESTS, 2), ("a", TOKENS, 180), ("d", REQUESTS, 1)]

    asyncio.run(main())


def test_a_failed_write_back_is_counted_not_raised():
    async def main():
        g, redis, clock = _guarded()
        redis.down = True
        assert await _admitted(g, "a", attempts=1) == 1
        redis.down, redis.debit_down = False, True
        clock.t += 1.0
        assert not (await g.acquire_quota("c", TIER, 1)).degraded
        await g.close()
        assert redis.debits == [] and g.counters.replayed == 0

    asyncio.run(main())


def test_what_is_owed_is_bounded():
    async def main():
        g, redis, clock = _guarded(max_owed=3)
        redis.down = True
        for i in range(10):
            await g.acquire_quota(f"k{i}", TIER, 1)
        redis.down = False
        clock.t += 1.0
        await g.acquire_quota("c", TIER, 1)
        await g.close()
        assert 0 < len(redis.debits) <= 3

    asyncio.run(main())


def test_fail_closed_owes_nothing():
    async def main():
        redis, clock = FakeRedis(), Clock()
        g = GuardedLimiter(redis, LocalLimiter(clock), FailurePolicy.FAIL_CLOSED, cooldown_s=1.0, clock=clock)
        redis.down = True
        with pytest.raises(LimiterUnavailable):
            await g.acquire_quota("a", TIER, 10)
        assert await g.debit("a", TIER, 10) is None
        redis.down = False
        clock.t += 1.0
        await g.acquire_quota("a", TIER, 10)
        await g.close()
        assert redis.debits == [] and g.counters.recoveries == 1

    asyncio.run(main())


# --- the Redis deadline --------------------------------------------------------------------------------------------


def test_deadline_adapts_up_to_slow_round_trips_within_the_ceiling():
    d = RoundTripDeadline(0.25, 2.0)
    assert d.timeout_s == 0.25
    d.observe(0.01)
    assert d.timeout_s == 0.25  # 4 x 10 ms: below the floor
    for _ in range(64):
        d.observe(0.2)
    assert d.timeout_s == pytest.approx(0.8)  # 4 x the p99
    for _ in range(64):
        d.observe(1.0)
    assert d.timeout_s == 2.0  # never past the ceiling


def test_deadline_comes_back_down_when_round_trips_do():
    d = RoundTripDeadline(0.25, 2.0, window=256)
    for _ in range(64):
        d.observe(0.3)
    assert d.timeout_s == pytest.approx(1.2)
    for _ in range(256 + 32):  # the window fills with fast round trips
        d.observe(0.005)
    assert d.timeout_s == 0.25


def test_deadline_ignores_rare_outliers():
    d = RoundTripDeadline(0.25, 2.0, window=256)
    for i in range(320):  # 2 slow round trips in any window of 256: under 1%
        d.observe(1.5 if i in (100, 200) else 0.01)
    assert d.timeout_s == 0.25


def test_deadline_without_a_ceiling_is_fixed():
    d = RoundTripDeadline(0.05)
    for _ in range(100):
        d.observe(1.0)
    assert d.timeout_s == 0.05
    for floor, ceiling in ((0, 1.0), (-1, None), (0.5, 0.25)):
        with pytest.raises(ValueError):
            RoundTripDeadline(floor, ceiling)


def test_rate_limiter_deadline_bounds():
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0")  # never connected
    adaptive = RateLimiter(client, timeout_s=0.25, max_timeout_s=2.0).deadline
    assert (adaptive.floor_s, adaptive.ceiling_s, adaptive.timeout_s) == (0.25, 2.0, 0.25)
    fixed = RateLimiter(client, timeout_s=0.1).deadline
    assert (fixed.floor_s, fixed.ceiling_s) == (0.1, 0.1)


# --- per-key concurrency caps --------------------------------------------------------------------------------------


def test_key_slots_split_a_cap_among_routers():
    routers = [1]
    slots = KeySlots(num_routers=lambda: routers[0])
    assert slots.limit(5) == 5
    routers[0] = 2
    assert (slots.limit(5), slots.limit(4), slots.limit(1)) == (3, 2, 1)  # rounded up, at least 1
    routers[0] = 10
    assert slots.limit(4) == 1
    routers[0] = 0
    assert slots.limit(4) == 4
    assert KeySlots().limit(7) == 7


def test_key_slots_hold_up_to_the_share_and_release_once():
    routers = [1]
    slots = KeySlots(num_routers=lambda: routers[0])
    held = [slots.try_hold("k", CALLS, 4) for _ in range(4)]
    assert all(s is not None for s in held) and slots.try_hold("k", CALLS, 4) is None
    assert slots.try_hold("k", SESSIONS, 4) is not None and slots.try_hold("other", CALLS, 4) is not None
    held[0].release()
    held[0].release()  # idempotent: gives back one slot, not two
    assert slots.held("k", CALLS) == 3
    assert slots.try_hold("k", CALLS, 4) is not None
    assert slots.try_hold("k", CALLS, 4) is None
    routers[0] = 2  # a second router came up: this one's share of 4 is 2
    for s in held[1:]:
        s.release()
    assert slots.held("k", CALLS) == 1
    assert slots.try_hold("k", CALLS, 4) is not None and slots.try_hold("k", CALLS, 4) is None
    assert slots.held("k", CALLS) == 2


def test_key_slots_forget_keys_holding_nothing():
    slots = KeySlots()
    taken = [slots.try_hold(f"k{i}", CALLS, 1) for i in range(100)]
    for s in taken:
        s.release()
    assert all(slots.held(f"k{i}", CALLS) == 0 for i in range(100))
    assert not slots._counts  # memory: only keys holding something


def test_deadline_doubles_on_a_timeout_then_follows_the_round_trips():
    d = RoundTripDeadline(0.25, 2.0, window=256)
    for _ in range(64):
        d.observe(0.01)
    d.timed_out()  # latency jumped past the deadline before any call could show it
    assert d.timeout_s == 0.5
    d.timed_out()
    assert d.timeout_s == 1.0
    for _ in range(32):  # the slower calls now succeed, and the deadline follows them
        d.observe(0.4)
    assert d.timeout_s == pytest.approx(1.6)
    for _ in range(3):
        d.timed_out()
    assert d.timeout_s == 2.0  # never past the ceiling
    fixed = RoundTripDeadline(0.05)
    fixed.timed_out()
    assert fixed.timeout_s == 0.05
