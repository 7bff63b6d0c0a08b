"""Auto-pipelining: the Redis commands that callers issue in one pass of the event loop go out as one pipeline.

Each caller still gets exactly one round trip for its own commands (its replies come back together, in order),
but concurrent callers share the write and the read: with N decisions in flight the client makes one `send` and
reads one buffer instead of N of each, which is most of what a decision costs this process. Alone, a caller waits
one loop pass longer than with a direct call (the batch is written at the end of the pass it was issued in).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import redis.asyncio as aioredis


class CommandBatcher:
    """`await batcher.run(commands)`: the replies of `commands` (each a tuple of command arguments), in order; a
    command Redis refused comes back as its exception instance, the others are unaffected. A failure of the
    connection itself (down, timed out) raises for every caller of that batch. Cancelling a caller does not cancel
    its batch (other callers share it): its replies go to its `abandoned` callback if it gave one (e.g. to undo a
    charge Redis applied for a caller that is gone), else they are dropped."""

    def __init__(self, redis_client: aioredis.Redis) -> None:
        self._redis = redis_client
        self._pending: list[tuple[Sequence[tuple], asyncio.Future]] = []
        self._flushing: set[asyncio.Task] = set()

    async def run(self, commands: Sequence[tuple], abandoned: Callable[[list], None] | None = None) -> list:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)  # after every caller of this pass has added its commands
        self._pending.append((commands, future))
        if abandoned is None:
            return await future
        try:
            return await asyncio.shield(future)  # (a future, not a coroutine: no task, the reply is kept)
        except asyncio.CancelledError:
            future.add_done_callback(lambda f: _hand_over(f, abandoned))
            raise

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _send(self, batch: list[tuple[Sequence[tuple], asyncio.Future]]) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for commands, _ in batch:
                    for command in commands:
                        pipe.execute_command(*command)
                replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # the connection failed (or the loop is closing): every caller learns it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else ConnectionError(repr(exc)))
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for commands, future in batch:
            if not future.done():
                future.set_result(replies[start:start + len(commands)])
            start += len(commands)


def _hand_over(future: asyncio.Future, abandoned: Callable[[list], None]) -> None:
    if not future.cancelled() and future.exception() is None:
        abandoned(future.result())
