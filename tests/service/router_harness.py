"""Shared pieces of the router tests: a router on its own event loop in a thread, API keys, auth metadata."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import grpc

from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from ratelimit.limiter import connect
from router.config import RouterConfig
from router.discovery import from_spec
from router.keys import ApiKeyStore
from router.worker_pool import WorkerPool


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def create_keys(redis_url: str, specs: dict[str, tuple[str, list[str]]]) -> dict[str, str]:
    """Create one key per name: specs maps name -> (tier, allowed models). Returns name -> plaintext key."""

    async def make():
        client = connect(redis_url, timeout_s=1.0)
        try:
            store = ApiKeyStore(client)
            out = {}
            for name, (tier, models) in specs.items():
                _, key = await store.create(f"tenant-{name}", tier, models)
                out[name] = key
            return out
        finally:
            await client.aclose()

    return asyncio.run(make())


@contextlib.contextmanager
def router_in_thread(config: RouterConfig, *, num_workers: int = 0, probe_key: str | None = None,
                     timeout_s: float = 30.0) -> Iterator[str]:
    """Run build_router(config) on a fresh event loop in a daemon thread; yield "127.0.0.1:PORT".

    Waits until `num_workers` workers are healthy in its pool and, with `probe_key`, until ListModels succeeds
    through the router. Stops the router (and its pool) on exit."""
    from router.server import build_router

    loop = asyncio.new_event_loop()
    started = threading.Event()
    state: dict = {}

    async def main():
        try:
            pool = WorkerPool(from_spec(config.workers))
            _, port, cleanup = await build_router(config, pool)
            if num_workers:
                assert await pool.wait_healthy(num_workers, timeout_s=timeout_s)
            state["port"], state["stop"] = port, asyncio.Event()
        except BaseException as exc:
            state["error"] = exc
            raise
        finally:
            started.set()
        await state["stop"].wait()
        await cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(timeout_s + 15), "router did not start"
    if "error" in state:
        raise state["error"]
    address = f"127.0.0.1:{state['port']}"
    if probe_key is not None:
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    stub.ListModels(pb.ListModelsRequest(), metadata=auth(probe_key), timeout=2)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
    try:
        yield address
    finally:
        loop.call_soon_threadsafe(state["stop"].set)
        thread.join(15)
