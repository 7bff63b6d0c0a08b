"""Worker.CacheEvents' side in the worker: the engine thread hands each step's prefix-cache changes to every
subscriber (a router's stream), and takes each new subscriber's snapshot itself, between two steps, so the
snapshot and the batches after it are exactly the cache."""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass

import structlog

log = structlog.get_logger("worker.cache_events")

# Batches a subscriber may have unread; past it the subscriber is ended (its router subscribes again and gets a
# fresh snapshot) rather than the engine waiting or a batch being dropped unseen.
MAX_UNREAD = 1024


@dataclass(frozen=True, slots=True)
class CacheBatch:
    snapshot: bool
    stored: list[int]
    evicted: list[int]


class Overflowed(Exception):
    """The subscriber fell MAX_UNREAD batches behind."""


class Subscriber:
    """One stream's queue, filled from the engine thread and read on the server's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[CacheBatch | None] = asyncio.Queue()
        self._unread = 0
        self._lock = threading.Lock()
        self.closed = False  # set by the reader when its stream ends; the engine then drops it

    def push(self, batch: CacheBatch) -> None:
        """From the engine thread; never blocks."""
        with self._lock:
            if self.closed:
                return
            self._unread += 1
            overflow = self._unread > MAX_UNREAD
            if overflow:
                self.closed = True
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, None if overflow else batch)
        except RuntimeError:  # its loop is closed: the server is gone
            self.closed = True

    async def next(self) -> CacheBatch:
        batch = await self._queue.get()
        if batch is None:
            raise Overflowed
        with self._lock:
            self._unread -= 1
        return batch


class CacheEventHub:
    """Subscribers of one engine's cache events. `epoch` names this process's cache: a restarted worker has
    another, and starts empty."""

    def __init__(self, block_size: int) -> None:
        self.epoch = uuid.uuid4().hex
        self.block_size = block_size
        self._subscribers: list[Subscriber] = []

    @property
    def num_subscribers(self) -> int:
        return len(self._subscribers)

    # --- engine thread

    def add(self, subscriber: Subscriber, keys: list[int]) -> None:
        """A new subscriber, given `keys` (the whole cache, taken on the engine thread after the last publish)."""
        subscriber.push(CacheBatch(True, keys, []))
        self._subscribers.append(subscriber)

    def publish(self, stored: list[int], evicted: list[int]) -> None:
        if self._subscribers and any(s.closed for s in self._subscribers):
            self._subscribers = [s for s in self._subscribers if not s.closed]
        if not (stored or evicted) or not self._subscribers:
            return
        batch = CacheBatch(False, stored, evicted)
        for subscriber in self._subscribers:
            subscriber.push(batch)
