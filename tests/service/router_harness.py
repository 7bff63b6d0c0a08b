"""Shared pieces of the router tests: a router on its own event loop in a thread, API keys, auth metadata."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from ratelimit.limiter import connect
from router.config import RouterConfig
from router.discovery import from_spec
from router.keys import ApiKeyStore
from router.worker_pool import WorkerPool
from worker.launch import WorkerProcess, start_worker


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


@dataclass
class RouterHandle:
    address: str
    pool: WorkerPool
    loop: asyncio.AbstractEventLoop

    def healthy(self) -> dict[str, bool]:
        """Worker address -> healthy, as the router's pool sees it now (read on the router's own loop)."""

        async def read():
            return {s.address: s.is_healthy for s in self.pool.snapshot()}

        return asyncio.run_coroutine_threadsafe(read(), self.loop).result(5)

    def wait_quiet(self, timeout_s: float = 10.0) -> None:
        """Until the pool's last polled Load of every worker shows nothing running, waiting or pending."""
        async def quiet():
            return all(s.num_running == s.num_waiting == s.num_pending_tokens == s.num_in_flight == 0
                       for s in self.pool.snapshot())

        deadline = time.monotonic() + timeout_s
        while not asyncio.run_coroutine_threadsafe(quiet(), self.loop).result(5):
            assert time.monotonic() < deadline, "the router's view of the workers never became idle"
            time.sleep(0.05)

    def wait_health(self, address: str, healthy: bool, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.healthy().get(address) != healthy:
            assert time.monotonic() < deadline, f"the router never saw {address} healthy={healthy}"
            time.sleep(0.05)


@contextlib.contextmanager
def serve_router(config: RouterConfig, *, num_workers: int = 0, timeout_s: float = 30.0,
                 health_timeout_s: float = 5.0) -> Iterator[RouterHandle]:
    """router.server.build_router on a fresh event loop in a thread, with a WorkerPool whose health timeout is
    `health_timeout_s`; yields once `num_workers` workers are healthy. Stops it (and its pool) on exit."""
    from router.server import build_router

    loop = asyncio.new_event_loop()
    started = threading.Event()
    state: dict = {}

    async def main():
        cleanup = None
        try:
            pool = WorkerPool(from_spec(config.workers), health_timeout_s=health_timeout_s)
            _, port, cleanup = await build_router(config, pool)
            if num_workers and not await pool.wait_healthy(num_workers, timeout_s=timeout_s):
                raise AssertionError(f"{num_workers} workers never became healthy")
            state.update(port=port, pool=pool, stop=asyncio.Event())
        except BaseException as exc:
            state["error"] = exc
            if cleanup is not None:
                await cleanup()
            return
        finally:
            started.set()
        await state["stop"].wait()
        await cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(timeout_s + 15), "router did not start"
    if "error" in state:
        thread.join(15)
        raise state["error"]
    try:
        yield RouterHandle(f"127.0.0.1:{state['port']}", state["pool"], loop)
    finally:
        loop.call_soon_threadsafe(state["stop"].set)
        thread.join(15)
        if not thread.is_alive():
            loop.close()


@contextlib.contextmanager
def router_in_thread(config: RouterConfig, *, num_workers: int = 0, probe_key: str | None = None,
                     timeout_s: float = 30.0) -> Iterator[str]:
    """serve_router, yielding only "127.0.0.1:PORT"; with `probe_key`, first waits until ListModels succeeds
    through the router."""
    with serve_router(config, num_workers=num_workers, timeout_s=timeout_s) as router:
        if probe_key is not None:
            with grpc.insecure_channel(router.address) as ch:
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
        yield router.address


def start_workers(model_dir: Path, logs: list[Path], *args: str) -> list[WorkerProcess]:
    """One worker process per log path (stderr there), started in parallel; `args` go to `python -m worker`."""

    def start(path: Path) -> WorkerProcess:
        with open(path, "wb") as log:
            return start_worker(model_dir, *args, stderr=log)

    with ThreadPoolExecutor(len(logs)) as ex:
        return list(ex.map(start, logs))
