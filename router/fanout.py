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
# stopped) before the job's worker stream is read by a task of its own and its deltas coalesced (Single). A lagging
# caller is noticed after LAGGING_S to 2 * LAGGING_S.
LAGGING_S = 0.25
_END = object()


class LagWatch:
    """Every LAGGING_S, looks at the Singles that are reading: one whose caller is still passing on the same message
    as at the last look is decoupled. One timer for all of them (while any reads), so a message costs two attribute
    writes, not a timer of its own."""

    def __init__(self, period_s: float = LAGGING_S) -> None:
        self.period_s = period_s
        self._singles: set[Single] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, single: Single) -> None:
        self._singles.add(single)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.period_s, self._look)

    def discard(self, single: Single) -> None:
        self._singles.discard(single)

    def _look(self) -> None:
        for single in list(self._singles):
            single.look()
        self._timer = (asyncio.get_running_loop().call_later(self.period_s, self._look) if self._singles
                       else None)


class Single:
    """One job. Its events are read straight from its worker call as the caller asks for them, on the caller's task:
    no task or buffer in between, so a message costs no extra pass of the event loop. Should the caller spend more
    than LAGGING_S passing one message on (its client reads slowly or stopped; see LagWatch), a task takes over
    reading the worker stream into an Outbox that merges the deltas piling up: the worker is never held back by a
    slow client, and what waits for that client is one message per output, not one per token."""

    __slots__ = ("jobs", "_relayed", "_source", "_outbox", "_pump", "_events", "_watch", "_passing", "_seen")

    def __init__(self, relayed: Relayed, watch: LagWatch) -> None:
        self.jobs = [relayed.job]
        self._relayed = relayed
        self._source = relayed.events()
        self._outbox: Outbox | None = None
        self._pump: asyncio.Task | None = None
        self._events: AsyncIterator | None = None
        self._watch = watch
        self._passing = -1  # the number of the message the caller is passing on, -1 while it is not
        self._seen = -1  # _passing at the watch's last look

    def events(self) -> AsyncIterator[tuple[int, wpb.WorkerEvent]]:
        if self._events is None:
            self._events = self._iterate()
        return self._events

    async def _iterate(self) -> AsyncIterator[tuple[int, wpb.WorkerEvent]]:
        source, n = self._source, 0
        self._watch.add(self)
        try:
            while self._outbox is None:
                try:
                    event = await anext(source)
                except StopAsyncIteration:
                    return
                self._passing = n = n + 1
                yield 0, event
                self._passing = -1
        finally:
            self._watch.discard(self)
        while True:  # decoupled: the pump reads the worker stream
            _, item = await self._outbox.get()
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield 0, item

    def look(self) -> None:
        """LagWatch: decouple when the caller is still passing on the message it was at the last look."""
        if self._passing >= 0 and self._passing == self._seen and self._outbox is None:
            self._watch.discard(self)
            self._outbox = Outbox()
            self._pump = asyncio.get_running_loop().create_task(self._read())
        self._seen = self._passing

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
        if self._events is not None:
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


def merged(relayed: Sequence[Relayed], watch: LagWatch) -> Single | Fanout:
    return Single(relayed[0], watch) if len(relayed) == 1 else Fanout(relayed)
