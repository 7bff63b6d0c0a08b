"""The router's grpc.health.v1: "" is SERVING while the router runs; "llamagrid.v1.Inference" is SERVING while at
least one worker in the pool is healthy. Both turn NOT_SERVING when the router starts draining."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from router.worker_pool import WorkerPool

INFERENCE_SERVICE = "llamagrid.v1.Inference"
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class RouterHealth:
    def __init__(self, pool: WorkerPool, interval_s: float = 0.5) -> None:
        self.pool = pool
        self.interval_s = interval_s
        self.servicer = HealthServicer()
        self._task: asyncio.Task | None = None
        self._draining = False
        self._last = None

    def ready(self) -> bool:
        """What "llamagrid.v1.Inference" reports: a healthy worker, and not draining (the HTTP readiness probe)."""
        return not self._draining and bool(self.pool.models())

    def add_to_server(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        await self.servicer.set("", SERVING)
        await self._update()
        self._task = asyncio.create_task(self._loop(), name="router-health")

    async def drain(self) -> None:
        """NOT_SERVING everywhere, for good: load balancers and probes stop sending new calls."""
        self._draining = True
        await self.stop()
        await self.servicer.enter_graceful_shutdown()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _update(self) -> None:
        status = SERVING if self.pool.models() else NOT_SERVING
        if not self._draining and status != self._last:
            self._last = status
            await self.servicer.set(INFERENCE_SERVICE, status)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._update()
