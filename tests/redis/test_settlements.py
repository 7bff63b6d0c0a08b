"""router.settlements against a real redis-server: finished calls' adjustments are summed per key and tier and
written together, refunds and excess charges alike."""

from __future__ import annotations

import asyncio

from ratelimit.limiter import Limit, RateLimiter, connect
from ratelimit.policy import FailurePolicy, GuardedLimiter
from ratelimit.tiers import Tier
from router.background import Background
from router.settlements import Settlements


def test_adjustments_of_one_key_are_summed_into_one_write(redis_server):
    tier = Tier(name="t", requests=Limit.per_second(1.0, 100), tokens=Limit.per_second(0.001, 1000))

    async def body():
        client = connect(redis_server.url, timeout_s=1.0)
        redis = RateLimiter(client, prefix="settle-test", timeout_s=1.0)
        limiter = GuardedLimiter(redis, policy=FailurePolicy.FAIL_CLOSED)
        try:
            await limiter.acquire_quota("a", tier, 600)  # 400 tokens left
            await limiter.acquire_quota("b", tier, 100)  # 900 left
            background = Background()
            settlements = Settlements(limiter, background, flush_s=0.01)
            for unused in (50, 70, -20):  # three calls of key a: net refund of 100
                settlements.add("a", tier, unused)
            settlements.add("b", tier, -300)  # one call of b used 300 more than it reserved
            assert background.pending == 1  # one task writes them all
            await background.wait()
            a = await limiter.acquire_quota("a", tier, 0)
            b = await limiter.acquire_quota("b", tier, 0)
            return a.tokens.remaining, b.tokens.remaining
        finally:
            await client.aclose()

    a, b = asyncio.run(body())
    assert 500 <= a <= 501 and 600 <= b <= 601  # (plus whatever refilled at 1 token/s)
