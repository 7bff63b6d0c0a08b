"""worker.cache_events: a subscriber's snapshot then batches, empty batches not sent, a closed subscriber dropped, and
one that falls MAX_UNREAD behind ended (its router subscribes again) rather than the engine waiting."""

from __future__ import annotations

import asyncio

import pytest

from worker.cache_events import MAX_UNREAD, CacheEventHub, Overflowed, Subscriber


def test_snapshot_then_batches_then_closed():
    async def main():
        hub = CacheEventHub(block_size=16)
        sub = Subscriber(asyncio.get_running_loop())
        hub.add(sub, [1, 2])
        hub.publish([], [])  # nothing changed: nothing sent
        hub.publish([3], [1])
        first, second = await sub.next(), await sub.next()
        assert (first.snapshot, first.stored) == (True, [1, 2])
        assert (second.snapshot, second.stored, second.evicted) == (False, [3], [1])
        sub.closed = True
        hub.publish([4], [])
        assert hub.num_subscribers == 0 and sub._queue.empty()

    asyncio.run(main())


def test_a_reader_that_falls_behind_is_ended():
    async def main():
        hub = CacheEventHub(block_size=16)
        slow, fast = Subscriber(asyncio.get_running_loop()), Subscriber(asyncio.get_running_loop())
        hub.add(slow, [])
        hub.add(fast, [])
        await fast.next()
        for i in range(MAX_UNREAD + 1):
            hub.publish([i], [])
            if i % 100 == 0:
                await asyncio.sleep(0)  # the loop delivers; fast reads, slow does not
                while not fast._queue.empty():
                    await fast.next()
        with pytest.raises(Overflowed):
            for _ in range(MAX_UNREAD + 2):
                await slow.next()
        assert not fast.closed and slow.closed

    asyncio.run(main())
