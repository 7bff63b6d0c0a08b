"""Tasks the router runs off a call's path (settlements, refunds, draining finished worker calls) and waits for
when it stops."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine


class Background:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def wait(self) -> None:
        """Until every task spawned so far has ended (errors are the tasks' own business)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
