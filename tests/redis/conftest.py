"""A runner for async limiter test bodies on the module's real redis-server (tests/conftest.py), flushed first."""

from __future__ import annotations

import asyncio

import pytest
import redis

from ratelimit.limiter import RateLimiter, connect


@pytest.fixture
def run(redis_server):
    """Flush Redis, then `run(body)` calls `await body(limiter, client)` on a fresh event loop and client."""
    with redis.Redis.from_url(redis_server.url) as sync_client:
        sync_client.flushall()

    def runner(body, timeout_s: float = 0.5):
        async def main():
            client = connect(redis_server.url, timeout_s=timeout_s)
            try:
                return await body(RateLimiter(client, timeout_s=timeout_s), client)
            finally:
                await client.aclose()

        return asyncio.run(main())

    return runner
