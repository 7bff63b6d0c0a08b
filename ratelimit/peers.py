"""Routers alive, counted in Redis: each router heartbeats its id into a sorted set, so every router knows how many
share the cluster-wide limits (its local fallback buckets and per-key caps take 1/N of a tier)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

log = structlog.get_logger("ratelimit.peers")

# KEYS[1]: sorted set of router ids scored by when each one's entry expires (ms of Redis TIME: one clock for every
# router; each entry carries its own router's TTL, so routers with different heartbeat settings never expire
# each other early)
# ARGV[1]: this router's id; ARGV[2]: how long (ms) its entry counts after this heartbeat
# Returns the number of routers whose entries have not expired, this one included.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]))
return redis.call('ZCARD', KEYS[1])
"""


def new_router_id() -> str:
    """`host-pid-random`: unique per router process, readable in `ZRANGE` when debugging."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


class PeerRegistry:
    """This router's entry in the registry of live routers, and the count of them it last saw.

    `start()` registers (one heartbeat, awaited) and heartbeats every `heartbeat_s` in the background; an id counts
    for `ttl_s` (default 3 heartbeats) after its last one, so a crashed router stops counting by itself. `stop()`
    deregisters. `count()` is the last count seen, at least 1: while Redis is unreachable it keeps the last one,
    and before any heartbeat succeeded it is 1 (this router alone, the whole tier)."""

    def __init__(self, redis_client: aioredis.Redis, router_id: str | None = None, key: str = "lg:routers",
                 heartbeat_s: float = 2.0, ttl_s: float | None = None, timeout_s: float = 1.0) -> None:
        if heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be positive, got {heartbeat_s!r}")
        self.router_id = router_id or new_router_id()
        self.key = key
        self.heartbeat_s = heartbeat_s
        self.ttl_s = 3 * heartbeat_s if ttl_s is None else ttl_s
        if self.ttl_s <= heartbeat_s:
            raise ValueError(f"ttl_s must exceed heartbeat_s, got {self.ttl_s!r} <= {heartbeat_s!r}")
        self.timeout_s = timeout_s
        self._redis = redis_client
        self._script = redis_client.register_script(_HEARTBEAT)
        self._count = 1
        self._reachable: bool | None = None
        self._task: asyncio.Task | None = None

    def count(self) -> int:
        """Routers alive as last seen (this one included), at least 1. Cheap: no I/O."""
        return self._count

    async def start(self) -> None:
        """Register now (best effort: an unreachable Redis leaves the count at 1), then heartbeat periodically."""
        await self.heartbeat()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._beat_forever())

    async def stop(self) -> None:
        """Stop heartbeating and leave the registry (best effort), so the others count one router less at once."""
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(self.timeout_s):
                await self._redis.zrem(self.key, self.router_id)

    async def heartbeat(self) -> int:
        """One heartbeat: refresh this router's entry, drop expired ones, and return the count (kept on failure)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                seen = int(await self._script(keys=[self.key], args=[self.router_id, int(self.ttl_s * 1000)]))
        except (RedisError, OSError, TimeoutError) as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # stop() cancelled this heartbeat as it timed out (or redis-py turned the cancel into an error):
                # honour the cancel, or the heartbeat loop would go on and stop() would wait for it for ever
                raise asyncio.CancelledError from exc
            if self._reachable is not False:
                log.warning("router_registry_unreachable", router_id=self.router_id, routers=self._count,
                            error=type(exc).__name__)
            self._reachable = False
            return self._count
        seen = max(1, seen)
        if seen != self._count or not self._reachable:
            log.info("router_registry_count", router_id=self.router_id, routers=seen)
        self._reachable = True
        self._count = seen
        return seen

    async def _beat_forever(self) -> None:
        me = asyncio.current_task()
        # a cancel that arrives inside a Redis command can be swallowed on its way out of redis-py: the loop checks
        # for it itself, so stop() never waits on a loop that goes on beating
        while not me.cancelling():
            await asyncio.sleep(self.heartbeat_s)
            await self.heartbeat()
