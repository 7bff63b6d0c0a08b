"""Client-side helpers for calls to the router: a Chat fed one request at a time, and what a refusal carries."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from protos.llamagrid.v1 import inference_pb2 as pb
from tests.support.router import auth
from tests.support.waits import POLL_S

SHORT = pb.SamplingParameters(max_new_tokens=4, temperature=0.0)


def raises(fn: Callable, code: grpc.StatusCode) -> grpc.RpcError:
    """The RpcError fn()'s call ends with (a streamed response is read to its end), which must carry `code`."""
    with pytest.raises(grpc.RpcError) as err:
        result = fn()
        if hasattr(result, "__next__"):
            list(result)
    assert err.value.code() == code, (err.value.code(), err.value.details())
    return err.value


def retry_delay_ms(err: grpc.RpcError) -> int:
    """RetryInfo's delay in ms (the details must carry RetryInfo and QuotaFailure)."""
    status = rpc_status.from_call(err)
    assert status is not None, "no google.rpc.Status details"
    info = error_details_pb2.RetryInfo()
    kinds = {d.type_url.rsplit("/", 1)[-1] for d in status.details}
    assert {"google.rpc.RetryInfo", "google.rpc.QuotaFailure"} <= kinds, kinds
    next(d for d in status.details if d.Is(info.DESCRIPTOR)).Unpack(info)
    return info.retry_delay.ToMilliseconds()


def quota_subjects(err: grpc.RpcError) -> list[str]:
    quota = error_details_pb2.QuotaFailure()
    next(d for d in rpc_status.from_call(err).details if d.Is(quota.DESCRIPTOR)).Unpack(quota)
    return [v.subject for v in quota.violations]


def eventually_ok(fn: Callable, what: str, timeout_s: float = 10.0):
    """fn() once it stops raising RESOURCE_EXHAUSTED (a slot freed), within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise AssertionError(f"{what}: {exc.code()} {exc.details()}") from exc
        time.sleep(POLL_S)


def turn(content: str = "hi", params: pb.SamplingParameters = SHORT, messages=None) -> pb.ChatRequest:
    messages = messages if messages is not None else [pb.ChatMessage(role="user", content=content)]
    return pb.ChatRequest(turn=pb.ChatTurn(messages=messages, parameters=params))


class Chat:
    """One Chat stream whose requests are sent one by one (a queue feeds the request iterator)."""

    def __init__(self, stub, key: str, timeout_s: float = 60.0, request_id: str | None = None,
                 channel: grpc.Channel | None = None) -> None:
        """With `channel`, the call goes through it with a serializer that also passes raw bytes (see send)."""
        self._requests: queue.Queue = queue.Queue()
        metadata = auth(key) + ((("x-request-id", request_id),) if request_id else ())

        def requests():
            while (item := self._requests.get()) is not None:
                yield item

        if channel is not None:
            chat = channel.stream_stream(
                "/llamagrid.v1.Inference/Chat", response_deserializer=pb.ChatEvent.FromString,
                request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString())
        else:
            chat = stub.Chat
        self.call = chat(requests(), metadata=metadata, timeout=timeout_s)

    def send(self, request: pb.ChatRequest | bytes | None) -> None:
        """Queue a request (bytes: sent as they are, with `channel`; None half-closes the stream)."""
        self._requests.put(request)

    def next(self) -> pb.ChatEvent:
        return next(self.call)

    def turn(self, request: pb.ChatRequest | None = None) -> pb.TurnEnd:
        """Send a turn (default: a short one) and read its events up to its end."""
        self.send(request if request is not None else turn())
        while True:
            event = self.next()
            if event.HasField("end"):
                return event.end

    def close(self) -> None:
        """Half-close the stream and read it to its end (OK)."""
        self._requests.put(None)
        assert list(self.call) == []

    def cancel(self) -> None:
        self.call.cancel()
        self._requests.put(None)
