"""ratelimit.batching.CommandBatcher against a real redis-server: commands issued in one event-loop pass share one
pipeline, each caller gets its own replies in order, a refused command touches only its caller, a dead connection
fails every caller of the batch, and a cancelled caller does not disturb the others."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import RedisError, ResponseError

from common.ports import free_port
from ratelimit.batching import CommandBatcher
from ratelimit.limiter import connect


def test_one_pass_of_callers_shares_one_pipeline_and_each_gets_its_own_replies(run):
    async def body(_, client):
        batcher = CommandBatcher(client)
        pipelines = 0
        make = client.pipeline

        def counting(*args, **kwargs):
            nonlocal pipelines
            pipelines += 1
            return make(*args, **kwargs)

        client.pipeline = counting
        await client.set("text", "not a number")
        results = await asyncio.gather(*(batcher.run([("INCRBY", f"n{i}", i), ("GET", f"n{i}")]) for i in range(50)),
                                       batcher.run([("INCR", "text"), ("INCR", "fine")]))
        assert pipelines == 1  # fifty-one callers, one write
        assert [r for r in results[:50]] == [[i, str(i).encode()] for i in range(50)]
        refused, fine = results[50]
        assert isinstance(refused, ResponseError) and fine == 1  # only the refused command is an error

        later = await batcher.run([("GET", "n7")])  # a later pass: a batch of its own
        assert later == [b"7"] and pipelines == 2

    run(body)


def test_a_cancelled_caller_leaves_its_batch_to_the_others(run):
    async def body(_, client):
        batcher = CommandBatcher(client)
        gone = asyncio.ensure_future(batcher.run([("INCR", "a")]))
        stays = asyncio.ensure_future(batcher.run([("INCR", "b")]))
        await asyncio.sleep(0)  # both issued in this pass
        gone.cancel()
        assert await stays == [1]
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert await client.get("a") == b"1"  # its command still ran: the batch was already going out

    run(body)


def test_a_dead_connection_fails_every_caller_of_the_batch():
    async def main():
        client = connect(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)  # nothing listens there
        try:
            batcher = CommandBatcher(client)
            results = await asyncio.gather(*(batcher.run([("PING",)]) for _ in range(3)), return_exceptions=True)
            assert all(isinstance(r, (RedisError, OSError)) for r in results), results
        finally:
            await client.aclose()

    asyncio.run(main())
