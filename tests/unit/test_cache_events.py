"""worker.cache_events and Worker.CacheEvents' handler: a subscriber's snapshot then batches, empty batches not sent,
a closed subscriber dropped, one that falls MAX_UNREAD behind ended (its router subscribes again) rather than the
engine waiting, every stream ended when the worker drains, and FAILED_PRECONDITION without prefix caching."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from worker.app import _drain
from worker.cache_events import MAX_UNREAD, CacheEventHub, Draining, Overflowed, Subscriber
from worker.kv_cache import BlockManager
from worker.server import WorkerServicer


async def _until(condition, what: str, timeout_s: float = 5.0) -> None:
    """Let the loop run (deliveries queued with call_soon_threadsafe, tasks reaching their first await) until
    condition() holds; AssertionError naming `what` past the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0)


def _blocked_reader(subscriber: Subscriber) -> bool:
    return bool(subscriber._queue._getters)  # a task waits in next() on its empty queue


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
        assert hub.num_subscribers == 1
        sub.close()
        assert hub.num_subscribers == 0
        hub.publish([4], [])
        assert not hub._subscribers and sub._queue.empty()

    asyncio.run(main())


def test_a_reader_that_falls_behind_is_ended_at_once():
    async def main():
        hub = CacheEventHub(block_size=16)
        slow, fast = Subscriber(asyncio.get_running_loop()), Subscriber(asyncio.get_running_loop())
        hub.add(slow, [])
        hub.add(fast, [])
        await fast.next()
        for i in range(MAX_UNREAD + 1):
            hub.publish([i], [])
            if i % 100 == 0:  # the loop delivers; fast reads, slow does not
                await _until(lambda: not fast._queue.empty(), "the batch delivered to the fast reader")
                while not fast._queue.empty():
                    await fast.next()
        with pytest.raises(Overflowed):
            await slow.next()  # the batches it had not read are of no use to it any more
        assert not fast.closed and slow.closed and hub.num_subscribers == 1

    asyncio.run(main())


def test_closing_the_hub_ends_every_stream_and_any_later_one():
    async def main():
        hub = CacheEventHub(block_size=16)
        waiting = Subscriber(asyncio.get_running_loop())
        hub.add(waiting, [])
        await waiting.next()
        reader = asyncio.create_task(waiting.next())
        await _until(lambda: _blocked_reader(waiting), "the reader blocked on its empty queue")
        hub.close()
        with pytest.raises(Draining):
            await asyncio.wait_for(reader, 5)
        late = Subscriber(asyncio.get_running_loop())
        hub.add(late, [7])
        with pytest.raises(Draining):
            await late.next()
        hub.publish([8], [])
        assert hub.num_subscribers == 0

    asyncio.run(main())


# ---- the handler (worker.server), on a stand-in engine that subscribes at once as the engine thread would


class _Aborted(Exception):
    pass


class _Context:
    code: grpc.StatusCode | None = None

    async def abort(self, code, details):
        self.code, self.details = code, details
        raise _Aborted


def _servicer(enable_prefix_caching: bool = True) -> tuple[WorkerServicer, CacheEventHub]:
    bm = BlockManager(4, 16, enable_prefix_caching)
    hub = CacheEventHub(bm.block_size)
    engine = SimpleNamespace(scheduler=SimpleNamespace(block_manager=bm), cache_events=hub,
                             subscribe_cache=lambda sub: hub.add(sub, [11, 12]))
    return WorkerServicer(SimpleNamespace(engine=engine)), hub


async def _status(stream, context: _Context) -> grpc.StatusCode:
    with pytest.raises(_Aborted):
        await anext(stream)
    return context.code


def test_without_prefix_caching_cache_events_is_a_failed_precondition():
    async def main():
        servicer, hub = _servicer(enable_prefix_caching=False)
        context = _Context()
        assert await _status(servicer.CacheEvents(wpb.CacheEventsRequest(), context), context) == \
            grpc.StatusCode.FAILED_PRECONDITION
        assert "prefix caching" in context.details and hub.num_subscribers == 0

    asyncio.run(main())


def test_the_stream_carries_epoch_and_block_size_and_ends_unavailable_when_the_worker_drains():
    async def main():
        servicer, hub = _servicer()
        context = _Context()
        stream = servicer.CacheEvents(wpb.CacheEventsRequest(), context)
        first = await anext(stream)
        assert (first.snapshot, list(first.stored), first.epoch, first.block_size) == (True, [11, 12], hub.epoch, 16)
        hub.publish([13], [11])
        second = await anext(stream)
        assert (second.snapshot, list(second.stored), list(second.evicted)) == (False, [13], [11])
        assert second.epoch == hub.epoch
        worker = SimpleNamespace(service=SimpleNamespace(num_in_flight=0, is_accepting=True),
                                 engine=SimpleNamespace(cache_events=hub), config=SimpleNamespace(drain_timeout_s=1))

        async def set_health(name, status):
            pass

        await _drain(worker, SimpleNamespace(set=set_health))
        assert await _status(stream, context) == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


def test_an_overflowed_stream_ends_resource_exhausted_and_a_cancelled_one_unsubscribes():
    async def main():
        servicer, hub = _servicer()
        context = _Context()
        stream = servicer.CacheEvents(wpb.CacheEventsRequest(), context)
        await anext(stream)
        for i in range(MAX_UNREAD + 1):
            hub.publish([i], [])
        assert await _status(stream, context) == grpc.StatusCode.RESOURCE_EXHAUSTED
        cancelled = servicer.CacheEvents(wpb.CacheEventsRequest(), _Context())
        await anext(cancelled)
        assert hub.num_subscribers == 1
        reading = asyncio.create_task(anext(cancelled))
        await _until(lambda: any(_blocked_reader(s) for s in hub._subscribers if not s.closed),
                     "the handler waiting for its next batch")
        reading.cancel()  # what gRPC does to the handler of a cancelled call
        with pytest.raises(asyncio.CancelledError):
            await reading
        assert hub.num_subscribers == 0

    asyncio.run(main())
