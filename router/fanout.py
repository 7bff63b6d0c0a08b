"""A call's jobs as one stream of (index, event): one job read on the caller's own task (Single), several merged
from a task per job (Fanout), token deltas coalesced while the caller lags behind the merge (router.outbox)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from router.outbox import Outbox


class Relayed(Protocol):
    """A job on its way through workers (router.relay.RelayedJob), its first worker call already open."""

    job: wpb.Job

    def events(self) -> AsyncIterator[wpb.WorkerEvent]: ...

    async def close(self) -> None: ...


# How long the caller may take to pass one message on (its client's stream full: a slow reader, or one that
# stopped) before the job's worker stream is read by a task of its own and its deltas coalesced (Single).
LAGGING_S = 0.25
_END = object()


class Single:
    """One job. Its events are read straight from its worker call as the caller asks for them, on the caller's task:
    no task or buffer in between, so a message costs no extra pass of the event loop. Should the caller spend more
    than LAGGING_S passing one message on (its client reads slowly or stopped), a task takes over reading the worker
    stream into an Outbox that merges the deltas piling up: the worker is never held back by a slow client, and what
    waits for that client is one message per output, not one per token."""

    __slots__ = ("jobs", "_relayed", "_source", "_outbox", "_pump", "_events")

    def __init__(self, relayed: Relayed) -> None:
        self.jobs = [relayed.job]
        self._relayed = relayed
        self._source = relayed.events()
        self._outbox: Outbox | None = None
        self._pump: asyncio.Task | None = None
        self._events: AsyncIterator | None = None

    def events(self) -> AsyncIterator[tuple[int, wpb.WorkerEvent]]:
        if self._events is None:
            self._events = self._iterate()
        return self._events

    async def _iterate(self) -> AsyncIterator[tuple[int, wpb.WorkerEvent]]:
        loop = asyncio.get_running_loop()
        source = self._source
        while self._outbox is None:
            try:
                event = await anext(source)
            except StopAsyncIteration:
                return
            lagging = loop.call_later(LAGGING_S, self._decouple, loop)
            try:
                yield 0, event
            finally:
                lagging.cancel()
        while True:  # decoupled: the pump reads the worker stream
            _, item = await self._outbox.get()
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield 0, item

    def _decouple(self, loop: asyncio.AbstractEventLoop) -> None:
        self._outbox = Outbox()
        self._pump = loop.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for event in self._source:
                self._outbox.put_event(0, event)
        except Exception as exc:
            self._outbox.put(exc)
        self._outbox.put(_END)

    @property
    def merged(self) -> int:
        return self._outbox.merged if self._outbox is not None else 0

    async def close(self) -> None:
        if self._events is not None:  # (its lag timer with it, should the caller have left at a message)
            await self._events.aclose()
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        await self._source.aclose()
        await self._relayed.close()


class Fanout:
    """Several jobs: each read by its own task, their events merged in order of arrival; `events()` yields
    (index, event) until every job has finished, re-raising the first job's exception; `close()` cancels what still
    runs. The tasks read as fast as the workers send, so one job's events never wait behind another's."""

    def __init__(self, relayed: Sequence[Relayed]) -> None:
        self.jobs = [r.job for r in relayed]
        self.outbox = Outbox()
        self._relayed = relayed
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._pump(i, r)) for i, r in enumerate(relayed)]

    @property
    def merged(self) -> int:
        return self.outbox.merged

    async def _pump(self, index: int, relayed: Relayed) -> None:
        try:
            async for event in relayed.events():
                self.outbox.put_event(index, event)
        except Exception as exc:
            self.outbox.put(exc)
        finally:
            await relayed.close()

    async def events(self) -> AsyncIterator[tuple[int, wpb.WorkerEvent]]:
        remaining = len(self.jobs)
        while remaining:
            index, event = await self.outbox.get()
            if isinstance(event, Exception):
                raise event
            if event.HasField("finished"):
                remaining -= 1
            yield index, event

    async def close(self) -> None:
        """Cancel the jobs still running (their worker calls with them) and wait until they have stopped."""
        running = [t for t in self._tasks if not t.done()]
        for t in running:
            t.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)


def merged(relayed: Sequence[Relayed]) -> Single | Fanout:
    return Single(relayed[0]) if len(relayed) == 1 else Fanout(relayed)
