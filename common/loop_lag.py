"""Event-loop lag: how late the loop runs a callback that was due at a known time.

Everything a grpc.aio process does waits in the same queue of ready callbacks: a new call is taken from gRPC once
per pass of the loop, a worker's message is relayed when its turn comes. The lag of a timer callback is the time a
pass takes end to end, so it is what each of those waits at that moment. Measured with a repeating timer (no task;
one callback per interval) into a Prometheus histogram."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Histogram

LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class LoopLag:
    """`{prefix}_event_loop_lag_seconds`, sampled every `interval_s` once started (and until stopped)."""

    def __init__(self, registry: CollectorRegistry, prefix: str, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.histogram = Histogram(f"{prefix}_event_loop_lag_seconds", "How late the event loop ran a timer "
                                   "callback: the wait of every ready callback (new calls, relayed messages) then.",
                                   buckets=LAG_BUCKETS, registry=registry)
        self.last_s = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self) -> None:
        due = self._loop.time() + self.interval_s
        self._handle = self._loop.call_at(due, self._tick, due)

    def _tick(self, due: float) -> None:
        self.last_s = max(0.0, self._loop.time() - due)
        self.histogram.observe(self.last_s)
        self._schedule()
