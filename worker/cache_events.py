"""Worker.CacheEvents' side in the worker: the engine thread hands each step's prefix-cache changes to every
subscriber (a router's stream), and takes each new subscriber's snapshot itself, between two steps, so the
snapshot and the batches after it are exactly the cache."""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass

# Batches a subscriber may have unread; past it the subscriber is ended (its router subscribes again and gets a
# fresh snapshot) rather than the engine waiting or a batch being dropped unseen.
MAX_UNREAD = 1024


@dataclass(frozen=True, slots=True)
class CacheBatch:
    snapshot: bool
    stored: list[int]
    evicted: list[int]


class StreamEnded(Exception):
    """The subscriber's stream is over; what it learned from it no longer holds."""


class Overflowed(StreamEnded):
    """The subscriber fell MAX_UNREAD batches behind."""


class Draining(StreamEnded):
    """The worker is draining: routers no longer send it jobs, so its cache no longer matters to them."""


class Subscriber:
    """One stream's queue, filled from the engine thread and read on the server's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[CacheBatch | None] = asyncio.Queue()  # None: wakes a reader to see _ended
        self._unread = 0
        self._lock = threading.Lock()
        self._ended: StreamEnded | None = None

    @property
    def closed(self) -> bool:
        return self._ended is not None

    def push(self, batch: CacheBatch) -> None:
        """From the engine thread; never blocks."""
        with self._lock:
            if self._ended is not None:
                return
            self._unread += 1
            if self._unread > MAX_UNREAD:
                self._ended = Overflowed()
                batch = None
        self._wake(batch)

    def end(self, reason: StreamEnded) -> None:
        """From any thread: the reader's next() raises `reason` (the first reason given stands)."""
        with self._lock:
            if self._ended is not None:
                return
            self._ended = reason
        self._wake(None)

    def close(self) -> None:
        """The reader is gone (its stream ended or was cancelled): the engine drops it at its next publish."""
        with self._lock:
            if self._ended is None:
                self._ended = StreamEnded()

    async def next(self) -> CacheBatch:
        """The next batch. Once the stream is ended, raises why at once: batches still queued would only be
        forgotten by the reader."""
        while True:
            if self._ended is not None:
                raise self._ended
            batch = await self._queue.get()
            if batch is not None:
                with self._lock:
                    self._unread -= 1
                return batch

    def _wake(self, item: CacheBatch | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # its loop is closed: nobody reads any more
            self.close()


class CacheEventHub:
    """Subscribers of one engine's cache events. `epoch` names this process's cache: a restarted worker has
    another, and starts empty."""

    def __init__(self, block_size: int) -> None:
        self.epoch = uuid.uuid4().hex
        self.block_size = block_size
        self._subscribers: list[Subscriber] = []
        self._closed = False
        self._lock = threading.Lock()  # the engine thread adds and publishes; close() comes from the server's loop

    @property
    def num_subscribers(self) -> int:
        """Streams open now (any thread)."""
        return sum(not s.closed for s in tuple(self._subscribers))

    def close(self) -> None:
        """End every stream with Draining, and any later one at once (any thread)."""
        with self._lock:
            self._closed = True
            subscribers, self._subscribers = self._subscribers, []
        for subscriber in subscribers:
            subscriber.end(Draining())

    # --- engine thread

    def add(self, subscriber: Subscriber, keys: list[int]) -> None:
        """A new subscriber, given `keys` (the whole cache, taken on the engine thread after the last publish)."""
        with self._lock:
            if self._closed:
                subscriber.end(Draining())
                return
            subscriber.push(CacheBatch(True, keys, []))
            self._subscribers.append(subscriber)

    def publish(self, stored: list[int], evicted: list[int]) -> None:
        if not self._subscribers:
            return
        with self._lock:
            if any(s.closed for s in self._subscribers):
                self._subscribers = [s for s in self._subscribers if not s.closed]
            if not (stored or evicted):
                return
            batch = CacheBatch(False, stored, evicted)
            for subscriber in self._subscribers:
                subscriber.push(batch)
