"""Load on routers for tests: many concurrent calls, a steady background load, and the Redis state they leave."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import redis

from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from tests.support.router import auth
from tests.support.waits import wait_until


@dataclass
class Outcome:
    router: int
    code: grpc.StatusCode
    initial: dict = field(default_factory=dict)
    trailing: dict = field(default_factory=dict)
    response: pb.GenerateResponse | None = None
    details: str = ""


async def _generate_many(addresses: list[str], key: str, request: pb.GenerateRequest, n: int,
                         timeout_s: float) -> list[Outcome]:
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    try:
        stubs = [pb_grpc.InferenceStub(ch) for ch in channels]

        async def one(i: int) -> Outcome:
            which = i % len(stubs)
            call = stubs[which].Generate(request, metadata=auth(key), timeout=timeout_s)
            try:
                response = await call
                return Outcome(which, grpc.StatusCode.OK, dict(await call.initial_metadata()), response=response)
            except grpc.aio.AioRpcError as exc:
                return Outcome(which, exc.code(), trailing=dict(exc.trailing_metadata() or ()), details=exc.details())

        return await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        for ch in channels:
            await ch.close()


def generate_many(addresses: list[str], key: str, request: pb.GenerateRequest, n: int,
                  timeout_s: float = 60.0) -> list[Outcome]:
    """`n` concurrent Generate calls, call i on router i % len(addresses)."""
    return asyncio.run(_generate_many(addresses, key, request, n, timeout_s))


def code_of(fn: Callable) -> grpc.StatusCode:
    """The status of fn()'s call (a streamed response is read to its end)."""
    try:
        result = fn()
        if hasattr(result, "__next__"):
            list(result)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


class SteadyLoad:
    """A thread sending small Generate calls back to back; records (started, ended, code) per call."""

    def __init__(self, address: str, key: str, timeout_s: float = 10.0) -> None:
        self.results: list[tuple[float, float, grpc.StatusCode]] = []
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(address)
        stub = pb_grpc.InferenceStub(self._channel)
        request = pb.GenerateRequest(inputs=["steady"], parameters=pb.SamplingParameters(max_new_tokens=1,
                                                                                           temperature=0.0))

        def loop():
            while not self._stop.is_set():
                t0 = time.monotonic()
                code = code_of(lambda: stub.Generate(request, metadata=auth(key), timeout=timeout_s))
                self.results.append((t0, time.monotonic(), code))
                self._stop.wait(0.01)  # (paces the load; not a wait for anything)

        self._thread = threading.Thread(target=loop, daemon=True)

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        self._channel.close()
        assert not self._thread.is_alive(), "a call of the steady load hung"

    def between(self, start: float, end: float) -> list[tuple[float, float, grpc.StatusCode]]:
        return [r for r in list(self.results) if r[0] >= start and r[1] <= end]

    def wait_calls(self, num: int, since: float, what: str, timeout_s: float = 15.0) -> None:
        """Until at least `num` calls started at or after `since` have ended."""
        wait_until(lambda: len(self.between(since, float("inf"))) >= num, what, timeout_s)


def redis_ms(url: str) -> float:
    with redis.Redis.from_url(url) as client:
        seconds, micros = client.time()
        return seconds * 1000 + micros / 1000


def bucket_field(url: str, key_id: str, bucket: str, name: str) -> float | None:
    """A field of a key's bucket hash in Redis ("req" or "tok"; "tokens" or "ts"), None when absent."""
    with redis.Redis.from_url(url) as client:
        raw = client.hget(f"rl:{{{key_id}}}:{bucket}", name)
    return None if raw is None else float(raw)


def levels(url: str, key_id: str) -> list[float | None]:
    """[request bucket level, token bucket level] of a key in Redis (None: no bucket yet)."""
    return [bucket_field(url, key_id, b, "tokens") for b in ("req", "tok")]
