"""A real redis-server for the session, flushed before each test, and a runner for async test bodies."""

from __future__ import annotations

import asyncio

import pytest
import redis

from ratelimit.limiter import RateLimiter, connect
from ratelimit.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server():
    with RedisServer() as server:
        yield server


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
