"""What one client stream is waiting to be sent: worker events in order, token deltas coalesced while they wait.

Workers' streams are read as fast as they produce; the client's stream is written as fast as the client reads.
When a client (or the router's event loop) falls behind, the deltas of one output that pile up are merged into one
message instead of queueing one message per token. So the buffer holds at most one pending delta per output plus
its end (its size in bytes is bounded by the text generated, never by how slow the client is), the worker is never
held back by a slow client, and one slow client costs the others nothing.
"""

from __future__ import annotations

import asyncio
from collections import deque

from protos.llamagrid.worker.v1 import worker_pb2 as wpb


class Outbox:
    """A FIFO of (index, item). `put_event` merges a delta into the pending delta of the same index, if any;
    `put` appends anything else (requests, errors, markers) unmerged. `get` waits for the next item."""

    __slots__ = ("_items", "_open", "_ready", "merged")

    def __init__(self) -> None:
        self._items: deque[tuple[int | None, object]] = deque()
        self._open: dict[int, wpb.WorkerEvent] = {}  # index -> its delta still waiting in _items
        self._ready = asyncio.Event()
        self.merged = 0  # deltas folded into an earlier one (a measure of how far behind the reader was)

    def __len__(self) -> int:
        return len(self._items)

    def put_event(self, index: int, event: wpb.WorkerEvent) -> None:
        if event.HasField("delta"):
            pending = self._open.get(index)
            if pending is not None:
                pending.delta.text += event.delta.text
                pending.delta.token_ids.extend(event.delta.token_ids)
                if event.delta.logprobs:
                    pending.delta.logprobs.extend(event.delta.logprobs)
                self.merged += 1
                return
            self._open[index] = event
        else:
            self._open.pop(index, None)
        self._items.append((index, event))
        self._ready.set()

    def put(self, item: object) -> None:
        self._items.append((None, item))
        self._ready.set()

    async def get(self) -> tuple[int | None, object]:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        index, item = self._items.popleft()
        if index is not None and self._open.get(index) is item:
            del self._open[index]
        return index, item
