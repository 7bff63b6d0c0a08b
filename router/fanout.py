"""One client stream fed by several worker jobs: each job runs in its own task, their events merged in order of
arrival, token deltas coalesced while the client lags (router.outbox)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from router.outbox import Outbox


class Fanout:
    """Starts every job at once (`run(job)` yields its worker events); `events()` yields (index, event) until every
    job has finished, re-raising the first job's exception; `close()` cancels what still runs. Starting is
    separate from reading, so the jobs can start before the caller is ready to read (dispatch ahead of admission:
    their events wait in the outbox)."""

    def __init__(self, jobs: list[wpb.Job], run: Callable[[wpb.Job], AsyncIterator[wpb.WorkerEvent]]) -> None:
        self.jobs = jobs
        self.outbox = Outbox()
        self._run = run
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._pump(i, job)) for i, job in enumerate(jobs)]

    async def _pump(self, index: int, job: wpb.Job) -> None:
        try:
            async for event in self._run(job):
                self.outbox.put_event(index, event)
        except Exception as exc:
            self.outbox.put(exc)

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
