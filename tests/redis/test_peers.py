"""ratelimit.peers on a real redis-server: routers count each other through heartbeats, a stopped router leaves at
once, a crashed one (a real process, SIGKILLed) expires after the TTL, and an unreachable Redis keeps the last
count."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from ratelimit.limiter import connect
from ratelimit.peers import PeerRegistry
from ratelimit.redis_server import RedisServer
from tests.support.waits import until

REPO = Path(__file__).resolve().parents[2]


def _key() -> str:
    return f"test:routers:{uuid.uuid4().hex}"


def test_routers_count_each_other_and_a_stopped_one_leaves(redis_server):
    key = _key()

    async def body():
        client = connect(redis_server.url, timeout_s=1.0)
        a = PeerRegistry(client, key=key, heartbeat_s=0.1)
        b = PeerRegistry(client, key=key, heartbeat_s=0.1)
        try:
            assert a.count() == 1  # before any heartbeat: alone
            await a.start()
            assert a.count() == 1
            await b.start()
            assert b.count() == 2  # b registered second: it saw a at once
            await until(lambda: a.count() == 2, what="a to see b")  # a sees b at its next heartbeat
            assert set(await client.zrange(key, 0, -1)) == {a.router_id.encode(), b.router_id.encode()}
            await b.stop()
            assert await client.zscore(key, b.router_id) is None  # deregistered, not left to expire
            await until(lambda: a.count() == 1, what="a to see b gone")
            await a.stop()
            assert await client.exists(key) == 0
        finally:
            await a.stop()
            await b.stop()
            await client.aclose()

    asyncio.run(body())


_CRASHING_ROUTER = textwrap.dedent("""
    import asyncio, sys
    from ratelimit.limiter import connect
    from ratelimit.peers import PeerRegistry

    async def main():
        registry = PeerRegistry(connect(sys.argv[1], timeout_s=1.0), router_id="crashing", key=sys.argv[2],
                                heartbeat_s=0.2, ttl_s=1.5)
        await registry.start()
        print("registered", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
""")


def test_a_crashed_router_expires_after_the_ttl(redis_server):
    key = _key()
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_ROUTER, redis_server.url, key], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    async def body():
        client = connect(redis_server.url, timeout_s=1.0)
        me = PeerRegistry(client, key=key, heartbeat_s=0.2, ttl_s=1.5)
        try:
            await me.start()
            await until(lambda: me.count() == 2, timeout_s=20, what="the other router's registration")
            proc.kill()  # no stop(): its entry stays until the TTL passes
            await asyncio.to_thread(proc.wait)
            assert await client.zscore(key, "crashing") is not None
            await until(lambda: me.count() == 1, what="the crashed router to expire")
            assert await client.zscore(key, "crashing") is None
        finally:
            await me.stop()
            await client.aclose()

    try:
        assert "registered" in (line.strip() for line in proc.stdout), "the other router never registered"
        asyncio.run(body())
    finally:
        proc.kill()
        proc.wait()


def test_unreachable_redis_keeps_the_last_count():
    with RedisServer() as server:

        async def body():
            client = connect(server.url, timeout_s=0.5)
            a = PeerRegistry(client, key="routers", heartbeat_s=60)  # heartbeats driven by hand below
            b = PeerRegistry(client, key="routers", heartbeat_s=60)
            try:
                await a.start()
                await b.start()
                assert await a.heartbeat() == 2
                server.kill()
                assert await a.heartbeat() == 2 and a.count() == 2  # Redis gone: the last count holds
                late = PeerRegistry(client, key="routers", heartbeat_s=60)
                await late.start()  # does not raise: alone until a heartbeat succeeds
                assert late.count() == 1
                await late.stop()  # best effort
                server.start()  # a fresh Redis: empty registry
                assert await a.heartbeat() == 1
                assert await b.heartbeat() == 2
                assert await a.heartbeat() == 2
            finally:
                await a.stop()
                await b.stop()
                await client.aclose()

        asyncio.run(body())


def test_registry_settings_are_validated(redis_server):
    client = connect(redis_server.url)
    with pytest.raises(ValueError, match="heartbeat_s"):
        PeerRegistry(client, heartbeat_s=0)
    with pytest.raises(ValueError, match="ttl_s"):
        PeerRegistry(client, heartbeat_s=1.0, ttl_s=1.0)
    registry = PeerRegistry(client, heartbeat_s=1.0)
    assert registry.ttl_s == 3.0 and str(os.getpid()) in registry.router_id
    assert PeerRegistry(client).router_id != registry.router_id
