"""Routers for tests: in a thread of the test process (its pool readable), or as `python -m router` processes
(their JSON stderr readable); API keys; auth metadata."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
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
from tests.support.logs import json_events
from tests.support.waits import wait_until

ROOT = Path(__file__).resolve().parents[2]
# what a clean router log never holds: a task or generator left behind, or a traceback
FORBIDDEN = ("Task exception", "destroyed but it is pending", "aclose", "never retrieved", "Traceback")


def config_for(workers, redis_url: str, tiers_path=None, **overrides) -> RouterConfig:
    """A router on a free port in front of `workers` (anything with an `address`), with a 0.5 s Redis deadline
    unless `overrides` say otherwise."""
    return RouterConfig(port=0, workers=",".join(w.address for w in workers), redis_url=redis_url,
                        tiers_path=tiers_path, **{"redis_timeout_s": 0.5, **overrides})


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@dataclass(frozen=True)
class Key:
    plaintext: str
    key_id: str


def new_keys(redis_url: str, specs: dict[str, tuple[str, list[str]] | str], prefix: str = "tenant") -> dict[str, Key]:
    """One fresh key per name: specs maps name -> tier, or (tier, allowed models); its tenant is `prefix-name`."""

    async def make():
        client = connect(redis_url, timeout_s=2.0)
        try:
            store = ApiKeyStore(client)
            out = {}
            for name, spec in specs.items():
                tier, models = (spec, []) if isinstance(spec, str) else spec
                record, plaintext = await store.create(f"{prefix}-{name}", tier, models)
                out[name] = Key(plaintext, record.key_id)
            return out
        finally:
            await client.aclose()

    return asyncio.run(make())


def create_keys(redis_url: str, specs: dict[str, tuple[str, list[str]]]) -> dict[str, str]:
    """new_keys, plaintexts only: name -> plaintext key."""
    return {name: key.plaintext for name, key in new_keys(redis_url, specs).items()}


def admin(redis_url: str, fn):
    """await fn(client, ApiKeyStore(client)) on a fresh connection: revoke a key, change its tier..."""

    async def run():
        client = connect(redis_url, timeout_s=2.0)
        try:
            return await fn(client, ApiKeyStore(client))
        finally:
            await client.aclose()

    return asyncio.run(run())


def wait_routable(address: str, key: str, timeout_s: float = 30.0) -> None:
    """Until ListModels through the router at `address` lists a model (its pool has a healthy worker)."""
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.InferenceStub(ch)

        def models():
            with contextlib.suppress(grpc.RpcError):
                return stub.ListModels(pb.ListModelsRequest(), metadata=auth(key), timeout=5).models
            return None

        wait_until(models, f"the router at {address} to list a model", timeout_s)


@dataclass
class RouterHandle:
    address: str
    pool: WorkerPool
    loop: asyncio.AbstractEventLoop
    http_url: str | None = None  # http://127.0.0.1:PORT with config.http_port

    def on_loop(self, coro_fn, timeout_s: float = 5.0):
        """Run `await coro_fn()` on the router's own loop (its pool is not thread-safe) and return the result."""
        return asyncio.run_coroutine_threadsafe(coro_fn(), self.loop).result(timeout_s)

    def healthy(self) -> dict[str, bool]:
        """Worker address -> healthy, as the router's pool sees it now."""

        async def read():
            return {s.address: s.is_healthy for s in self.pool.snapshot()}

        return self.on_loop(read)

    def wait_quiet(self, timeout_s: float = 10.0) -> None:
        """Until the pool's last polled Load of every worker shows nothing running, waiting or pending."""

        async def quiet():
            return all(s.num_running == s.num_waiting == s.num_pending_tokens == s.num_in_flight == 0
                       for s in self.pool.snapshot())

        wait_until(lambda: self.on_loop(quiet), "the router's view of the workers to be idle", timeout_s)

    def wait_health(self, address: str, healthy: bool, timeout_s: float = 15.0) -> None:
        wait_until(lambda: self.healthy().get(address) == healthy, f"the router to see {address} healthy={healthy}",
                   timeout_s)


@contextlib.contextmanager
def serve_router(config: RouterConfig, *, num_workers: int = 0, timeout_s: float = 30.0,
                 health_timeout_s: float = 5.0, load_interval_s: float = 0.5) -> Iterator[RouterHandle]:
    """router.server.build_router on a fresh event loop in a thread, with a WorkerPool of the given health timeout
    and Load interval; yields once `num_workers` workers are healthy. Stops it (and its pool) on exit."""
    from router.server import build_router

    loop = asyncio.new_event_loop()
    started = threading.Event()
    state: dict = {}

    async def main():
        cleanup = None
        try:
            pool = WorkerPool(from_spec(config.workers), health_timeout_s=health_timeout_s,
                              load_interval_s=load_interval_s)
            served = await build_router(config, pool)
            port, cleanup = served.port, served.cleanup
            if num_workers and not await pool.wait_healthy(num_workers, timeout_s=timeout_s):
                raise AssertionError(f"{num_workers} workers never became healthy")
            state.update(port=port, http_port=served.http_port, pool=pool, stop=asyncio.Event())
        except BaseException as exc:
            state["error"] = exc
            if cleanup is not None:
                await cleanup()
            return
        finally:
            started.set()
        await state["stop"].wait()
        await cleanup()

    def run() -> None:
        loop.run_until_complete(main())
        # as asyncio.run does: async generators left suspended (a worker call's request stream) are closed while
        # the loop still runs, not finalized by the garbage collector after it closed
        loop.run_until_complete(loop.shutdown_asyncgens())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(timeout_s + 15), "router did not start"
    if "error" in state:
        thread.join(15)
        raise state["error"]
    try:
        http = state["http_port"]
        yield RouterHandle(f"127.0.0.1:{state['port']}", state["pool"], loop,
                           f"http://127.0.0.1:{http}" if http is not None else None)
    finally:
        loop.call_soon_threadsafe(state["stop"].set)
        thread.join(15)
        if not thread.is_alive():
            loop.close()


@contextlib.contextmanager
def router_in_thread(config: RouterConfig, *, num_workers: int = 0, probe_key: str | None = None,
                     timeout_s: float = 30.0) -> Iterator[str]:
    """serve_router, yielding only "127.0.0.1:PORT"; with `probe_key`, first waits until ListModels through the
    router lists a model."""
    with serve_router(config, num_workers=num_workers, timeout_s=timeout_s) as router:
        if probe_key is not None:
            wait_routable(router.address, probe_key, timeout_s)
        yield router.address


def log_problems(text: str) -> list[str]:
    """Lines of a router's stderr that are not one JSON object, or that tell of a task or generator left behind."""
    bad = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if (not isinstance(event, dict) or any(s in line for s in FORBIDDEN)
                or event.get("event") == "event_loop_error"  # (how the router logs asyncio's own errors)
                or (event.get("source") == "asyncio" and event.get("level") in ("error", "critical"))):
            bad.append(line)
    return bad


class RouterProcess:
    """`python -m router --port 0 --port-file ... *args` with its stderr (JSON lines) in `log_path`."""

    def __init__(self, log_path: Path, *args: str, env: dict[str, str] | None = None, timeout_s: float = 30.0,
                 stdout=subprocess.DEVNULL) -> None:
        self.log_path = log_path
        port_file = log_path.with_suffix(".port")
        port_file.unlink(missing_ok=True)
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "router", "--port", "0", "--port-file", str(port_file),
                                          *args], cwd=ROOT, env=env, stdout=stdout, stderr=log)
        port = wait_until(lambda: (port_file.exists() and port_file.read_text().strip())
                          or self.proc.poll() is not None, "the router's port file", timeout_s)
        assert self.proc.poll() is None, f"the router exited with {self.proc.returncode}:\n{self.log_tail()}"
        self.address = f"127.0.0.1:{port}"

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def log_text(self, start: int = 0) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")

    def events(self, name: str | None = None, start: int = 0) -> list[dict]:
        """The JSON objects of its stderr from byte offset `start` (lines that do not parse are skipped), all or
        those of event `name`."""
        with open(self.log_path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        return json_events(text, name)

    def wait_event(self, name: str, what: str = "", timeout_s: float = 15.0, where=lambda e: True,
                   count: int = 1) -> list[dict]:
        return wait_until(lambda: len(found := [e for e in self.events(name) if where(e)]) >= count and found,
                          what or f"{count} {name} event(s) in the router's log", timeout_s)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (drain), then SIGKILL past the timeout; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()
