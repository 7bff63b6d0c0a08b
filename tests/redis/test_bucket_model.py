"""The Lua token buckets against a pure-Python reference model, on a real redis-server and its real clock.

The sequence tests use refill rates so slow that the whole test refills a negligible fraction of a unit: whole-unit
values (allowed, remaining) must match the model exactly and waits (retry-after, reset-after) within the elapsed
wall time. A separate test checks refill itself at a fast rate, bounding the elapsed Redis time by wall-clock
readings taken around the calls.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit.limiter import REQUESTS, TOKENS, Limit, RateLimiter, connect
from tests.support.waits import until

# One unit per 100 minutes: a test of ~20 s refills ~0.003 units, never a whole one.
SLOW_RATE_PER_MINUTE = 0.01
WAIT_SLACK_S = 0.05  # rounding of the script's float output, on top of the measured elapsed time


@dataclass
class ModelBucket:
    """Reference bucket without refill: `level` units of `burst`; a missing bucket is full."""

    burst: int
    level: float | None = None

    @property
    def current(self) -> float:
        return float(self.burst) if self.level is None else self.level


@dataclass(frozen=True)
class Expected:
    allowed: bool
    remaining: int
    retry_after_s: float  # math.inf when the cost can never fit
    reset_after_s: float
    stored: bool  # the bucket's hash exists in Redis after the call (a full bucket is deleted)


def model_charge(buckets: dict[str, ModelBucket], limits: dict[str, Limit],
                 ops: list[tuple[str, int]], force: bool = False) -> list[Expected]:
    """What token_bucket.lua should answer for one call of (bucket, cost) pairs; a negative cost is a refund;
    `force` debits even what does not fit (debt)."""
    levels = [buckets[name].current for name, _ in ops]
    all_allowed = force or all(level >= cost for level, (_, cost) in zip(levels, ops, strict=True))
    out = []
    for level, (name, cost) in zip(levels, ops, strict=True):
        limit = limits[name]
        rate_per_s = limit.rate_per_minute / 60.0
        allowed = level >= cost
        retry = 0.0 if allowed else math.inf if cost > limit.burst else (cost - level) / rate_per_s
        if all_allowed:
            level = min(limit.burst, level - cost)
            buckets[name].level = None if level >= limit.burst else level
        out.append(Expected(allowed, max(0, math.floor(level)), retry, (limit.burst - level) / rate_per_s,
                            buckets[name].level is not None))
    return out


def _check(decision, expected: Expected, elapsed_s: float, what: str) -> None:
    """Compare one Decision with the model: exact units, waits shorter by at most the refill time elapsed."""
    assert decision.allowed == expected.allowed, what
    assert decision.remaining == expected.remaining, what
    if math.isinf(expected.retry_after_s):
        assert math.isinf(decision.retry_after_s), what
    else:
        assert expected.retry_after_s - elapsed_s - WAIT_SLACK_S <= decision.retry_after_s, what
        assert decision.retry_after_s <= expected.retry_after_s + WAIT_SLACK_S, what
    assert expected.reset_after_s - elapsed_s - WAIT_SLACK_S <= decision.reset_after_s, what
    assert decision.reset_after_s <= expected.reset_after_s + WAIT_SLACK_S, what


bursts = st.tuples(st.integers(1, 8), st.integers(1, 120))
acquire_quota = st.tuples(st.just("quota"), st.integers(0, 140))
acquire_pair = st.tuples(st.just("pair"), st.integers(0, 10), st.integers(0, 140))
acquire_one = st.tuples(st.just("acquire"), st.sampled_from([REQUESTS, TOKENS]), st.integers(0, 140))
refund = st.tuples(st.just("refund"), st.sampled_from([REQUESTS, TOKENS]), st.integers(0, 150))
debit = st.tuples(st.just("debit"), st.sampled_from([REQUESTS, TOKENS]), st.integers(0, 150))
operations = st.lists(st.one_of(acquire_quota, acquire_pair, acquire_one, refund, debit), min_size=1, max_size=25)


@pytest.fixture(scope="module")
def redis_url(redis_server) -> str:
    return redis_server.url


@settings(max_examples=100, deadline=None)
@given(bursts=bursts, ops=operations)
def test_bucket_sequences_match_the_reference_model(redis_url, bursts, ops):
    """Bursts, both-or-neither debits of two buckets, refunds capped at the burst, retry/reset waits, deletion of
    full buckets: every Decision of a random operation sequence equals the model's."""
    limits = {REQUESTS: Limit(SLOW_RATE_PER_MINUTE, bursts[0]), TOKENS: Limit(SLOW_RATE_PER_MINUTE, bursts[1])}
    key = f"model-{uuid.uuid4().hex}"  # a fresh key per example: no flush needed, examples cannot interfere

    async def body():
        client = connect(redis_url, timeout_s=2.0)
        try:
            limiter = RateLimiter(client, timeout_s=2.0)
            buckets = {name: ModelBucket(limit.burst) for name, limit in limits.items()}
            started = time.monotonic()
            for step, op in enumerate(ops):
                if op[0] == "quota":  # one request and `tokens` tokens, both or neither
                    calls = [(REQUESTS, 1), (TOKENS, op[1])]
                    got = await limiter.acquire_quota(key, limits[REQUESTS], limits[TOKENS], op[1])
                    decisions = [got.requests, got.tokens]
                elif op[0] == "pair":
                    calls = [(REQUESTS, op[1]), (TOKENS, op[2])]
                    decisions = list(await limiter.acquire(key, [(n, limits[n], c) for n, c in calls]))
                elif op[0] == "acquire":
                    _, name, cost = op
                    calls = [(name, cost)]
                    decisions = list(await limiter.acquire(key, [(name, limits[name], cost)]))
                elif op[0] == "debit":
                    _, name, amount = op
                    calls = [(name, amount)]
                    decisions = [await limiter.debit(key, limits[name], amount, bucket=name)]
                else:
                    _, name, amount = op
                    calls = [(name, -amount)]
                    decisions = [await limiter.refund(key, limits[name], amount, bucket=name)]
                expected = model_charge(buckets, limits, calls, force=op[0] == "debit")
                elapsed = time.monotonic() - started + 0.01
                for (name, cost), d, e in zip(calls, decisions, expected, strict=True):
                    what = f"step {step} {op}: bucket {name} cost {cost}: got {d}, model {e}"
                    _check(d, e, elapsed, what)
                    assert d.limit == limits[name].burst, what
                    assert bool(await client.exists(limiter.bucket_key(key, name))) == e.stored, what
                if op[0] == "quota":
                    quota_expected = max((e.retry_after_s for e in expected if not e.allowed), default=0.0)
                    assert got.allowed == all(e.allowed for e in expected)
                    if math.isinf(quota_expected):
                        assert math.isinf(got.retry_after_s)
                    else:
                        assert got.retry_after_s == pytest.approx(quota_expected, abs=elapsed + WAIT_SLACK_S)
            # both buckets' stored levels agree with the model (refill so far is a tiny fraction of a unit)
            for name, bucket in buckets.items():
                raw = await client.hget(limiter.bucket_key(key, name), "tokens")
                if bucket.level is None:
                    assert raw is None
                else:
                    assert bucket.level <= float(raw) < bucket.level + 0.01
        finally:
            await client.aclose()

    asyncio.run(body())


def test_two_bucket_denial_debits_neither_and_reports_each(redis_url):
    """A hand-written case of the model's both-or-neither rule: the denying bucket sets retry-after, the other
    reports allowed with its undebited level."""
    rpm, tpm = Limit(SLOW_RATE_PER_MINUTE, 3), Limit(SLOW_RATE_PER_MINUTE, 50)
    key = f"pair-{uuid.uuid4().hex}"

    async def body():
        client = connect(redis_url, timeout_s=2.0)
        try:
            limiter = RateLimiter(client, timeout_s=2.0)
            first = await limiter.acquire_quota(key, rpm, tpm, 40)
            assert first.allowed and (first.requests.remaining, first.tokens.remaining) == (2, 10)
            second = await limiter.acquire_quota(key, rpm, tpm, 11)
            assert not second.allowed and second.requests.allowed and not second.tokens.allowed
            assert (second.requests.remaining, second.tokens.remaining) == (2, 10)
            assert second.requests.retry_after_s == 0
            per_unit_s = 60.0 / SLOW_RATE_PER_MINUTE
            assert second.retry_after_s == pytest.approx(per_unit_s, abs=1.0)  # one token short
            refunded = await limiter.refund(key, tpm, 1000)  # capped at the burst: the bucket is full and deleted
            assert refunded.allowed and refunded.remaining == 50 and refunded.reset_after_s == 0
            assert not await client.exists(limiter.bucket_key(key, TOKENS))
            third = await limiter.acquire_quota(key, rpm, tpm, 11)
            assert third.allowed and (third.requests.remaining, third.tokens.remaining) == (1, 39)
        finally:
            await client.aclose()

    asyncio.run(body())


def test_refill_follows_elapsed_redis_time(redis_url):
    """A fast bucket (20 units/s, burst 10): drained at once, it refills rate * elapsed (bounded by wall-clock
    readings around the calls), a denied cost's retry-after is its missing units / rate, waiting that long admits
    it, and a long wait fills it to the burst (the key is deleted)."""
    rate_per_s, burst = 20.0, 10
    limit = Limit.per_second(rate_per_s, burst)
    key = f"refill-{uuid.uuid4().hex}"

    async def body():
        client = connect(redis_url, timeout_s=2.0)
        try:
            limiter = RateLimiter(client, timeout_s=2.0)
            bucket_key = limiter.bucket_key(key, REQUESTS)
            w0 = time.monotonic()
            (drained,) = await limiter.acquire(key, [(REQUESTS, limit, burst)])
            w1 = time.monotonic()
            assert drained.allowed and drained.remaining == 0
            assert drained.reset_after_s == pytest.approx(burst / rate_per_s)

            # the refill over elapsed time is what is measured: time has to pass, bounded by the readings around it
            await asyncio.sleep(0.2)
            w2 = time.monotonic()
            (probe,) = await limiter.acquire(key, [(REQUESTS, limit, 0)])
            w3 = time.monotonic()
            lo, hi = rate_per_s * (w2 - w1), rate_per_s * (w3 - w0)  # bounds on the refill between the calls
            assert probe.allowed
            assert math.floor(lo) <= probe.remaining <= min(burst, math.floor(hi))
            assert (burst - min(burst, hi)) / rate_per_s - 0.01 <= probe.reset_after_s
            assert probe.reset_after_s <= (burst - lo) / rate_per_s + 0.01

            cost = 9
            w4 = time.monotonic()
            (denied,) = await limiter.acquire(key, [(REQUESTS, limit, cost)])
            w5 = time.monotonic()
            assert not denied.allowed
            # level at the denial is rate * elapsed since the drain; retry-after = (cost - level) / rate
            assert cost / rate_per_s - (w5 - w0) - 0.01 <= denied.retry_after_s
            assert denied.retry_after_s <= cost / rate_per_s - (w4 - w1) + 0.01
            # under test: waiting the advertised retry-after is enough (so the wait is that time, not a condition)
            await asyncio.sleep(denied.retry_after_s + 0.03)
            (admitted,) = await limiter.acquire(key, [(REQUESTS, limit, cost)])
            assert admitted.allowed and admitted.remaining <= 2

            # full again: Redis drops the key at the moment the bucket would be full (its TTL)
            async def expired() -> bool:
                return await client.exists(bucket_key) == 0

            await until(expired, "the refilled bucket's key to expire", timeout_s=burst / rate_per_s + 5)
            (full,) = await limiter.acquire(key, [(REQUESTS, limit, 0)])  # capped at the burst
            assert full.allowed and full.remaining == burst and full.reset_after_s == 0
            assert not await client.exists(bucket_key)
        finally:
            await client.aclose()

    asyncio.run(body())


def test_expiry_matches_time_to_full(redis_url):
    """A partly spent bucket's key expires when the bucket would be full again (so idle keys do not pile up)."""
    limit = Limit.per_second(5.0, 10)
    key = f"ttl-{uuid.uuid4().hex}"

    async def body():
        client = connect(redis_url, timeout_s=2.0)
        try:
            limiter = RateLimiter(client, timeout_s=2.0)
            (d,) = await limiter.acquire(key, [(REQUESTS, limit, 4)])
            ttl_ms = await client.pttl(limiter.bucket_key(key, REQUESTS))
            assert d.allowed and d.remaining == 6
            assert 0 < ttl_ms <= 800 and ttl_ms == pytest.approx(d.reset_after_s * 1000, abs=100)
        finally:
            await client.aclose()

    asyncio.run(body())


def test_bucket_refunded_to_full_leaves_no_key(redis_url):
    """A bucket debited and refunded back to full leaves no hash behind."""
    limit = Limit(SLOW_RATE_PER_MINUTE, 5)
    key = f"gone-{uuid.uuid4().hex}"

    async def body():
        client = connect(redis_url, timeout_s=2.0)
        try:
            limiter = RateLimiter(client, timeout_s=2.0)
            await limiter.acquire(key, [(TOKENS, limit, 3)])
            await limiter.refund(key, limit, 3)
        finally:
            await client.aclose()

    asyncio.run(body())
    with redis.Redis.from_url(redis_url) as sync_client:
        assert sync_client.keys(f"rl:{{{key}}}:*") == []
