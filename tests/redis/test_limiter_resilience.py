"""The limiter's Redis client on a real redis-server that restarts, stalls, or answers slowly: a Redis restart costs
no decision (a stale pooled connection is retried once on a fresh one), a timed-out command is not sent twice, and a
slow but healthy Redis does not trip the fallback once the deadline has adapted, where a fixed deadline does."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from ratelimit.limiter import REQUESTS, Limit, RateLimitBackendError, RateLimiter, connect
from ratelimit.local import LocalLimiter
from ratelimit.policy import GuardedLimiter
from ratelimit.redis_server import RedisServer
from ratelimit.tiers import Tier

SLOW = Limit(0.001, 10)  # no refill to speak of: remaining counts the charges
ROOMY = Tier("roomy", Limit(1e9, 10**9), Limit(1e9, 10**9))  # every call allowed


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_first_decision_after_a_redis_restart_succeeds(how):
    with RedisServer() as server:

        async def body():
            client = connect(server.url)  # the router's client: build_router uses the same connect()
            limiter = RateLimiter(client)
            guarded = GuardedLimiter(limiter)
            try:
                assert (await limiter.acquire("k", [(REQUESTS, SLOW, 1)]))[0].remaining == 9
                getattr(server, how)()
                server.start()  # same port; the client's pooled connection is now dead
                (after,) = await limiter.acquire("k", [(REQUESTS, SLOW, 1)])  # no RateLimitBackendError
                assert after.allowed and after.remaining == 9  # a fresh Redis: the bucket starts full
                getattr(server, how)()
                server.start()
                d = await guarded.acquire_quota("k", ROOMY, 1)
                assert d.allowed and not d.degraded
                assert guarded.counters.backend_errors == 0 and guarded.counters.fallbacks == 0
            finally:
                await client.aclose()

        asyncio.run(body())


@pytest.mark.parametrize("how", ["script-flush", "restart"])
def test_decisions_that_find_the_script_gone_reload_it_on_one_connection(how):
    with RedisServer() as server:

        async def body():
            client = connect(server.url)
            limiter = RateLimiter(client)
            try:
                await limiter.acquire("warm", [(REQUESTS, SLOW, 1)])
                if how == "script-flush":
                    await client.script_flush()
                else:
                    server.stop()
                    server.start()
                before = (await client.info("stats"))["total_connections_received"]
                results = await asyncio.gather(*(limiter.acquire(f"k{i}", [(REQUESTS, SLOW, 1)]) for i in range(64)))
                assert all(d.allowed and d.remaining == 9 for (d,) in results)
                # one connection for the whole burst (and the INFO calls): not one per caller to load the script
                assert (await client.info("stats"))["total_connections_received"] - before <= 1
            finally:
                await client.aclose()

        asyncio.run(body())


def test_a_timed_out_command_is_not_sent_again():
    with RedisServer() as server:

        async def body():
            client = connect(server.url, timeout_s=0.2)
            limiter = RateLimiter(client, timeout_s=0.2, max_timeout_s=2.0)  # the socket timeout fires first
            try:
                await limiter.acquire("k", [(REQUESTS, SLOW, 1)])
                before = (await client.info("stats"))["total_connections_received"]
                os.kill(server.pid, signal.SIGSTOP)  # connections are still accepted (queued), nothing is answered
                try:
                    with pytest.raises(RateLimitBackendError, match="Timeout"):
                        await limiter.acquire("k", [(REQUESTS, SLOW, 1)])
                finally:
                    os.kill(server.pid, signal.SIGCONT)
                (after,) = await limiter.acquire("k", [(REQUESTS, SLOW, 1)])
                # 10 - this call - the first - the timed-out one if Redis ran it once (never twice)
                assert after.remaining >= 7
                # one new connection: this call's (the timed-out one was dropped); a retry would have opened another
                assert (await client.info("stats"))["total_connections_received"] - before == 1
            finally:
                await client.aclose()

        asyncio.run(body())


class DelayProxy:
    """A TCP proxy in front of Redis that holds every reply `delay_s` before passing it on: a healthy Redis on a
    busy host, as the client sees it. Requests go through at once."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.delay_s = 0.0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()
        self._pumps: set[asyncio.Task] = set()

    async def start(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def close(self) -> None:
        self._server.close()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._handlers.add(asyncio.current_task())
        loop = asyncio.get_running_loop()
        replies: asyncio.Queue = asyncio.Queue()
        writers = [client_w]

        async def requests(upstream_w: asyncio.StreamWriter) -> None:
            while data := await client_r.read(65536):
                upstream_w.write(data)
                await upstream_w.drain()

        async def read_replies(upstream_r: asyncio.StreamReader) -> None:
            while data := await upstream_r.read(65536):
                replies.put_nowait((loop.time() + self.delay_s, data))
            replies.put_nowait((0.0, b""))

        async def write_replies() -> None:
            while True:
                due, data = await replies.get()
                if not data:
                    return
                await asyncio.sleep(max(0.0, due - loop.time()))  # the delay this proxy exists to add
                client_w.write(data)
                await client_w.drain()

        try:
            upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            writers.append(upstream_w)
            pumps = {asyncio.ensure_future(c) for c in (requests(upstream_w), read_replies(upstream_r),
                                                         write_replies())}
            self._pumps |= pumps
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)  # one side closed (or close())
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._pumps -= pumps
        except OSError:
            pass
        finally:
            for w in writers:
                w.close()
            self._handlers.discard(asyncio.current_task())


def test_a_slow_healthy_redis_does_not_trip_the_fallback_once_the_deadline_adapted(redis_server):
    async def body():
        proxy = await DelayProxy(redis_server.port).start()
        # as build_router makes them: socket timeout at the ceiling, deadline adapting from the floor (here 1 s
        # rather than the default 2 s, to keep the stalled case short); and two fixed deadlines, the older settings.
        # The adaptive limiter's clock can be moved on: its fallback cooldown is passed without waiting it out.
        skew = [0.0]
        adaptive_client = connect(proxy.url, timeout_s=1.0, connect_timeout_s=0.25)
        adaptive = GuardedLimiter(RateLimiter(adaptive_client, timeout_s=0.25, max_timeout_s=1.0), LocalLimiter(),
                                  clock=lambda: time.monotonic() + skew[0])
        fixed_client = connect(proxy.url, timeout_s=0.25)
        fixed = GuardedLimiter(RateLimiter(fixed_client, timeout_s=0.25), LocalLimiter(), cooldown_s=0.0)
        old_client = connect(proxy.url, timeout_s=0.05)
        old = GuardedLimiter(RateLimiter(old_client, timeout_s=0.05), LocalLimiter(), cooldown_s=0.0)

        async def calls(limiter: GuardedLimiter, n: int = 16) -> list:
            """n decisions at once: one round trip through the proxy (they share a pipeline)."""
            return await asyncio.gather(*(limiter.acquire_quota(f"k{i}", ROOMY, 1) for i in range(n)))

        async def rounds(*limiters: GuardedLimiter) -> None:
            """Two rounds of calls (32 round trips each: the deadline is recomputed every 32)."""
            for _ in range(2):
                await asyncio.gather(*(calls(limiter) for limiter in limiters))

        try:
            for limiter in (adaptive, fixed, old):  # connected, script loaded: a router at work
                await limiter.acquire_quota("warm", ROOMY, 1)
            proxy.delay_s = 0.01  # a quiet host
            await rounds(adaptive)
            assert adaptive.counters.fallbacks == 0

            # the host gets busier, step by step: every round trip takes 100 ms, then 200 ms
            proxy.delay_s = 0.1
            old_before = old.counters.fallbacks
            await rounds(adaptive, old)
            assert adaptive.counters.fallbacks == 0
            assert old.counters.fallbacks - old_before == 32  # a 50 ms deadline fails every call on a healthy Redis
            assert adaptive.redis.deadline.timeout_s >= 0.4  # 4 x the p99 of what it saw
            proxy.delay_s = 0.2
            await rounds(adaptive)
            assert adaptive.counters.fallbacks == 0
            assert adaptive.redis.deadline.timeout_s >= 0.8

            proxy.delay_s = 0.35  # past the older fixed 0.25 s deadline, well within the adapted one
            fixed_before = fixed.counters.fallbacks
            await rounds(adaptive, fixed)
            assert adaptive.counters.fallbacks == 0 and adaptive.counters.backend_errors == 0
            assert fixed.counters.fallbacks - fixed_before == 32
            assert adaptive.redis.deadline.timeout_s == 1.0  # 4 x 0.35 s, held at the ceiling

            proxy.delay_s = 1.5  # a Redis slower than the ceiling still counts as failed, after the ceiling
            started = asyncio.get_running_loop().time()
            assert all(d.degraded for d in await calls(adaptive, 4))
            assert asyncio.get_running_loop().time() - started < 1.5  # it did not wait for the reply
            assert adaptive.counters.backend_errors == 4  # (all four were in flight together)

            proxy.delay_s = 0.0  # quiet again: the deadline comes back down (to the floor on an idle host)
            skew[0] += adaptive.cooldown_s  # the cooldown after those failures is over: Redis is tried again
            for _ in range(18):  # more than a window (256) of fast round trips
                assert not any(d.degraded for d in await calls(adaptive))
            assert adaptive.redis.deadline.timeout_s < 1.0
        finally:
            for c in (adaptive_client, fixed_client, old_client):
                await c.aclose()
            await proxy.close()

    asyncio.run(body())
