"""RateLimiter and its Lua token buckets against a real redis-server (no mocks)."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time

import pytest
from redis.crc import key_slot

from ratelimit.limiter import REQUESTS, TOKENS, Limit, RateLimitBackendError, RateLimiter, connect
from ratelimit.redis_server import RedisServer, find_redis_server
from tests.support.waits import until

SLOW = Limit(rate_per_minute=1, burst=10)  # refills one unit a minute: nothing refills during a test


def test_find_redis_server_is_executable():
    assert os.access(find_redis_server(), os.X_OK)


def test_burst_allowed_then_denied_with_retry_after(run):
    limit = Limit.per_second(10, burst=5)

    async def body(limiter, _):
        return [(await limiter.acquire("k", [(REQUESTS, limit, 1)]))[0] for _ in range(6)]

    decisions = run(body)
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions[:5]] == [4, 3, 2, 1, 0]
    assert all(d.retry_after_s == 0 and d.limit == 5 for d in decisions[:5])
    denied = decisions[5]
    assert 0 < denied.retry_after_s <= 0.1  # one token at 10/s, minus what refilled meanwhile
    assert denied.reset_after_s - denied.retry_after_s == pytest.approx(0.4)  # four more tokens to full


async def _expired(client, key: str) -> bool:
    return await client.exists(key) == 0


def test_refill_over_time(run):
    limit = Limit.per_second(50, burst=2)

    async def body(limiter, client):
        for _ in range(2):
            assert (await limiter.acquire("k", [(REQUESTS, limit, 1)]))[0].allowed
        (denied,) = await limiter.acquire("k", [(REQUESTS, limit, 1)])
        assert not denied.allowed
        # under test: waiting the advertised retry-after is enough (so the wait is that time, not a condition)
        await asyncio.sleep(denied.retry_after_s + 0.005)
        (again,) = await limiter.acquire("k", [(REQUESTS, limit, 1)])
        assert again.allowed
        # full again (Redis drops the key then): more refill than the burst is capped at the burst of 2
        await until(lambda: _expired(client, limiter.bucket_key("k", REQUESTS)), "the bucket to refill")
        (full,) = await limiter.acquire("k", [(REQUESTS, limit, 0)])
        assert full.allowed and full.remaining == 2 and full.reset_after_s == 0

    run(body)


def test_token_denial_does_not_debit_requests(run):
    rpm, tpm = Limit(60, burst=5), Limit(60, burst=100)

    async def body(limiter, client):
        first = await limiter.acquire_quota("k", rpm, tpm, tokens=60)
        assert first.allowed and first.requests.remaining == 4 and first.tokens.remaining == 40
        second = await limiter.acquire_quota("k", rpm, tpm, tokens=60)
        assert not second.allowed
        assert second.requests.allowed and not second.tokens.allowed
        assert second.requests.remaining == 4 and second.tokens.remaining == 40
        assert second.retry_after_s == second.tokens.retry_after_s
        assert 19 < second.retry_after_s <= 20  # 20 tokens at one a second
        too_big = await limiter.acquire_quota("k", rpm, tpm, tokens=101)
        assert not too_big.allowed and math.isinf(too_big.retry_after_s)
        stored = float(await client.hget(limiter.bucket_key("k", REQUESTS), "tokens"))
        assert 4 <= stored < 4.1

    run(body)


def test_request_denial_does_not_debit_tokens(run):
    rpm, tpm = Limit(60, burst=1), Limit(60, burst=100)

    async def body(limiter, _):
        assert (await limiter.acquire_quota("k", rpm, tpm, tokens=10)).allowed
        denied = await limiter.acquire_quota("k", rpm, tpm, tokens=10)
        assert not denied.allowed and not denied.requests.allowed and denied.tokens.allowed
        assert denied.tokens.remaining == 90
        assert 0.5 < denied.retry_after_s <= 1.0

    run(body)


def test_refund_returns_tokens_but_never_above_burst(run):
    tpm = Limit(60, burst=100)

    async def body(limiter, client):
        (taken,) = await limiter.acquire("k", [(TOKENS, tpm, 80)])
        assert taken.remaining == 20
        assert (await limiter.refund("k", tpm, 30)).remaining == 50
        full = await limiter.refund("k", tpm, 1000)
        assert full.remaining == 100 and full.reset_after_s == 0
        assert await client.exists(limiter.bucket_key("k", TOKENS)) == 0  # a full bucket is no key at all
        assert (await limiter.refund("fresh", tpm, 5)).remaining == 100
        with pytest.raises(ValueError):
            await limiter.refund("k", tpm, -1)
        with pytest.raises(ValueError):
            await limiter.acquire("k", [(TOKENS, tpm, -1)])

    run(body)


def test_debit_goes_into_debt_and_later_calls_wait(run):
    """Usage found after the fact (tokens beyond a reservation) is charged even when the bucket cannot pay: it goes
    below zero, and the next call waits for the refill of the debt plus its cost."""
    tpm = Limit(6000, burst=100)  # 100 per second

    async def body(limiter, client):
        (taken,) = await limiter.acquire("k", [(TOKENS, tpm, 90)])
        assert taken.remaining == 10
        debt = await limiter.debit("k", tpm, 60)
        assert not debt.allowed and debt.remaining == 0 and debt.reset_after_s == pytest.approx(1.5, abs=0.05)
        (after,) = await limiter.acquire("k", [(TOKENS, tpm, 10)])
        assert not after.allowed and after.retry_after_s == pytest.approx(0.6, abs=0.05)  # -50 + 60 refilled = 10
        level = float(await client.hget(limiter.bucket_key("k", TOKENS), "tokens"))
        assert -51 < level < -45
        with pytest.raises(ValueError):
            await limiter.debit("k", tpm, -1)

    run(body)


def test_keys_expire_when_full_again(run):
    async def body(limiter, client):
        await limiter.acquire_quota("k", Limit(60, burst=10), Limit(6000, burst=1000), tokens=500)
        req_ttl = await client.pttl(limiter.bucket_key("k", REQUESTS))
        tok_ttl = await client.pttl(limiter.bucket_key("k", TOKENS))
        assert 500 < req_ttl <= 1000  # one request at one a second
        assert 4500 < tok_ttl <= 5000  # 500 tokens at 100 a second
        fast = Limit.per_second(1000, burst=1)
        await limiter.acquire("idle", [(REQUESTS, fast, 1)])
        await until(lambda: _expired(client, limiter.bucket_key("idle", REQUESTS)),
                    "the idle bucket's key to expire (full again after 1 ms)", timeout_s=1.0)

    run(body)


def test_noscript_recovery_after_script_flush(run):
    async def body(limiter, client):
        assert (await limiter.acquire("k", [(REQUESTS, SLOW, 1)]))[0].remaining == 9
        await client.script_flush()
        assert (await limiter.acquire("k", [(REQUESTS, SLOW, 1)]))[0].remaining == 8
        assert await client.script_exists(limiter._sha) == [True]

    run(body)


def test_concurrent_acquires_allow_exactly_burst(run):
    async def body(limiter, _):
        return await asyncio.gather(*(limiter.acquire("k", [(REQUESTS, SLOW, 1)]) for _ in range(50)))

    results = run(body, timeout_s=2.0)
    assert sum(d.allowed for (d,) in results) == 10


def test_keys_share_one_hash_tag(run):
    async def body(limiter, client):
        await limiter.acquire_quota("tenant-a", SLOW, Limit(60, 100), tokens=5)
        return sorted(k.decode() for k in await client.keys("*")), limiter

    keys, limiter = run(body)
    assert keys == ["rl:{tenant-a}:req", "rl:{tenant-a}:tok"]
    assert key_slot(keys[0].encode()) == key_slot(keys[1].encode())
    with pytest.raises(ValueError):
        limiter.bucket_key("a}b", REQUESTS)


def test_limit_validation():
    with pytest.raises(ValueError):
        Limit(0, 1)
    with pytest.raises(ValueError):
        Limit(60, 0)


def test_dead_redis_raises_quickly_then_recovers():
    with RedisServer() as server:

        async def body():
            client = connect(server.url, timeout_s=0.05)
            limiter = RateLimiter(client, timeout_s=0.2)
            try:
                assert (await limiter.acquire("k", [(REQUESTS, SLOW, 1)]))[0].allowed
                server.kill()
                for _ in range(2):  # the pooled connection breaks, then a fresh connect is refused
                    started = time.monotonic()
                    with pytest.raises(RateLimitBackendError):
                        await limiter.acquire("k", [(REQUESTS, SLOW, 1)])
                    assert time.monotonic() - started < 0.5
                server.start()
                (after,) = await limiter.acquire("k", [(REQUESTS, SLOW, 1)])
                assert after.allowed and after.remaining == 9  # a restarted Redis starts empty
            finally:
                await client.aclose()

        asyncio.run(body())


def test_stalled_redis_times_out_quickly():
    with RedisServer() as server:

        async def body():
            client = connect(server.url, timeout_s=0.05)
            limiter = RateLimiter(client, timeout_s=0.2)
            try:
                await limiter.acquire("k", [(REQUESTS, SLOW, 1)])
                os.kill(server.pid, signal.SIGSTOP)
                try:
                    started = time.monotonic()
                    with pytest.raises(RateLimitBackendError):
                        await limiter.acquire("k", [(REQUESTS, SLOW, 1)])
                    assert time.monotonic() - started < 0.5
                finally:
                    os.kill(server.pid, signal.SIGCONT)
                assert (await limiter.acquire("k", [(REQUESTS, SLOW, 1)]))[0].allowed
            finally:
                await client.aclose()

        asyncio.run(body())
