"""A small typed client for llamagrid's public `Inference` service (the router).

    from llamagrid.client import Client

    with Client("127.0.0.1:50051", api_key="lg_...") as client:
        print(client.generate("Hello", max_new_tokens=16, temperature=0.2).text)
        for chunk in client.generate_stream("Once upon a time", max_new_tokens=32):
            print(chunk.text, end="", flush=True)
        chat = client.chat(system="You are terse.", temperature=0.7)
        for event in chat.send("Hi!"):
            ...  # ChatDelta objects, then one TurnEnd

`AsyncClient` has the same methods as coroutines / async iterators (grpc.aio).

Retries (RetryPolicy): UNAVAILABLE, and RESOURCE_EXHAUSTED that advertises a finite retry delay (`retry-after-ms`
trailer or google.rpc.RetryInfo), are retried with exponential backoff and jitter, never sooner than the server
asked, and never past the call's overall deadline (`timeout`). A stream is retried only while it has yielded
nothing; a failure after the first chunk or chat event raises (with `streamed=True`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import grpc
from google.rpc import error_details_pb2, status_pb2

from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc

ADDRESS_ENV = "LLAMAGRID_ADDRESS"
API_KEY_ENV = "LLAMAGRID_API_KEY"
DEFAULT_ADDRESS = "127.0.0.1:50051"
RETRY_AFTER_TRAILER = "retry-after-ms"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"

__all__ = [
    "AsyncChatSession", "AsyncClient", "ChatDelta", "ChatSession", "Client", "Completion", "GenerateChunk",
    "LlamagridError", "ModelInfo", "RetryPolicy", "TokenCount", "TurnEnd", "Usage", "sampling_parameters",
]


# ---------------------------------------------------------------------------------------------------------- errors


class LlamagridError(Exception):
    """A failed call: the gRPC `code`, the server's `details`, `retry_after_s` (the server's advertised wait, or
    None), `streamed` (True when the call had already yielded results) and the `trailing_metadata`."""

    def __init__(self, code: grpc.StatusCode, details: str, *, retry_after_s: float | None = None,
                 streamed: bool = False, trailing_metadata: tuple[tuple[str, Any], ...] = ()) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after_s = retry_after_s
        self.streamed = streamed
        self.trailing_metadata = trailing_metadata


class Unauthenticated(LlamagridError):
    pass


class PermissionDenied(LlamagridError):
    pass


class InvalidArgument(LlamagridError):
    pass


class NotFound(LlamagridError):
    pass


class RateLimited(LlamagridError):
    """RESOURCE_EXHAUSTED: a quota is spent; `retry_after_s` is None when the request can never fit."""


class Unavailable(LlamagridError):
    pass


class DeadlineExceeded(LlamagridError):
    pass


class Cancelled(LlamagridError):
    pass


_ERROR_CLASSES: dict[grpc.StatusCode, type[LlamagridError]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimited,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def _retry_after_s(trailers: Sequence[tuple[str, Any]]) -> float | None:
    """The server's requested wait: the `retry-after-ms` trailer, else google.rpc.RetryInfo in the status details."""
    for key, value in trailers:
        if key == RETRY_AFTER_TRAILER:
            try:
                ms = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(ms) and ms >= 0:
                return ms / 1000.0
    for key, value in trailers:
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except Exception:  # noqa: BLE001 - malformed details are ignored, not fatal
                return None
            for detail in status.details:
                info = error_details_pb2.RetryInfo()
                if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
                    return info.retry_delay.ToMilliseconds() / 1000.0
    return None


def error_from_rpc(exc: grpc.RpcError, *, streamed: bool = False) -> LlamagridError:
    """The LlamagridError subclass for a grpc.RpcError (sync or aio)."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if callable(getattr(exc, "details", None)) else None) or ""
    trailers = exc.trailing_metadata() if callable(getattr(exc, "trailing_metadata", None)) else None
    trailers = tuple(trailers or ())
    cls = _ERROR_CLASSES.get(code, LlamagridError)
    return cls(code, details, retry_after_s=_retry_after_s(trailers), streamed=streamed, trailing_metadata=trailers)


# ---------------------------------------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetryPolicy:
    """`max_attempts` tries in all (1 = no retry). Waits grow from `initial_backoff_s` by `multiplier` up to
    `max_backoff_s`, each drawn uniformly from [wait * (1 - jitter), wait]; a server's retry-after raises the wait
    to at least that (but one longer than `max_retry_after_s` is not waited for: the error is raised)."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2
    max_retry_after_s: float = 60.0
    retry_unavailable: bool = True
    retry_rate_limited: bool = True

    def delay_s(self, attempt: int, error: LlamagridError, remaining_s: float | None) -> float | None:
        """Seconds to wait before try `attempt + 1` (attempt counts from 1), or None: don't retry."""
        if error.streamed or attempt >= self.max_attempts:
            return None
        if error.code == grpc.StatusCode.UNAVAILABLE:
            if not self.retry_unavailable:
                return None
        elif error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            if not self.retry_rate_limited or error.retry_after_s is None:
                return None
        else:
            return None
        wait = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        wait *= 1.0 - self.jitter * random.random()
        if error.retry_after_s is not None:
            if error.retry_after_s > self.max_retry_after_s:
                return None
            wait = max(wait, error.retry_after_s)
        if remaining_s is not None and wait >= remaining_s:
            return None
        return wait


NO_RETRY = RetryPolicy(max_attempts=1)


class _Deadline:
    def __init__(self, timeout_s: float | None) -> None:
        self.at = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())


# ---------------------------------------------------------------------------------------------------------- results


def _reason(value: int) -> str | None:
    return None if value == pb.FINISH_REASON_UNSPECIFIED else pb.FinishReason.Name(value)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0

    @classmethod
    def from_pb(cls, u: pb.Usage) -> Usage:
        return cls(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)


@dataclass(frozen=True)
class Completion:
    """One input's completion. `finish_reason`: "LENGTH", "STOP", "EOS" or "CANCELLED"."""

    text: str
    finish_reason: str | None
    token_ids: tuple[int, ...]
    usage: Usage

    @classmethod
    def from_pb(cls, c: pb.Completion) -> Completion:
        return cls(c.text, _reason(c.finish_reason), tuple(c.token_ids), Usage.from_pb(c.usage))


@dataclass(frozen=True)
class GenerateChunk:
    """Part of input `index`'s completion; the last chunk of each input has `finish_reason` and `usage` set."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    usage: Usage | None = None

    @classmethod
    def from_pb(cls, c: pb.GenerateChunk) -> GenerateChunk:
        last = c.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        return cls(c.index, c.text, tuple(c.token_ids), _reason(c.finish_reason),
                   Usage.from_pb(c.usage) if last or c.HasField("usage") else None)


@dataclass(frozen=True)
class ChatDelta:
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class TurnEnd:
    finish_reason: str | None
    usage: Usage


ChatEvent = ChatDelta | TurnEnd


def _event_from_pb(e: pb.ChatEvent) -> ChatEvent:
    if e.HasField("delta"):
        return ChatDelta(e.delta.text, tuple(e.delta.token_ids))
    return TurnEnd(_reason(e.end.finish_reason), Usage.from_pb(e.end.usage))


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_context: int


@dataclass(frozen=True)
class TokenCount:
    count: int
    max_context: int


# ---------------------------------------------------------------------------------------------------------- requests

_PARAM_NAMES = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty",
                "ignore_eos")


def sampling_parameters(**params: Any) -> pb.SamplingParameters:
    """pb.SamplingParameters from keyword arguments (None = unset: the model's default); unknown names: TypeError."""
    unknown = sorted(set(params) - set(_PARAM_NAMES))
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(unknown)}; allowed: {', '.join(_PARAM_NAMES)}")
    out = pb.SamplingParameters()
    for name, value in params.items():
        if value is None:
            continue
        if name == "stop":
            out.stop.extend([value] if isinstance(value, str) else list(value))
        else:
            setattr(out, name, value)
    return out


Message = tuple[str, str] | dict[str, str] | pb.ChatMessage


def _messages(messages: str | Message | Sequence[Message]) -> list[pb.ChatMessage]:
    """A user message from text; else (role, content) pairs, {"role", "content"} dicts or pb.ChatMessage."""
    if isinstance(messages, str):
        return [pb.ChatMessage(role="user", content=messages)]
    if isinstance(messages, pb.ChatMessage | dict) or (isinstance(messages, tuple) and len(messages) == 2
                                                        and all(isinstance(x, str) for x in messages)):
        messages = [messages]  # type: ignore[list-item]
    out = []
    for m in messages:  # type: ignore[union-attr]
        if isinstance(m, pb.ChatMessage):
            out.append(m)
        elif isinstance(m, dict):
            out.append(pb.ChatMessage(role=m["role"], content=m["content"]))
        else:
            role, content = m
            out.append(pb.ChatMessage(role=role, content=content))
    return out


def _count_request(model: str, text: str | None, messages: Any) -> pb.CountTokensRequest:
    if (text is None) == (messages is None):
        raise TypeError("count_tokens takes exactly one of text or messages")
    if text is not None:
        return pb.CountTokensRequest(model=model, text=text)
    return pb.CountTokensRequest(model=model, chat=pb.ChatTurn(messages=_messages(messages), model=model))


def _read_root_certificates(root_certificates: bytes | str | os.PathLike | None) -> bytes | None:
    if root_certificates is None or isinstance(root_certificates, bytes):
        return root_certificates
    with open(root_certificates, "rb") as f:
        return f.read()


class _Base:
    def __init__(self, address: str | None, api_key: str | None, *, tls: bool,
                 root_certificates: bytes | str | os.PathLike | None, timeout: float | None,
                 retry: RetryPolicy | None, model: str, metadata: Sequence[tuple[str, str]]) -> None:
        self.address = address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.metadata: tuple[tuple[str, str], ...] = tuple(metadata) + (
            (("authorization", f"Bearer {key}"),) if key else ())
        self.tls = tls or root_certificates is not None
        self._root_certificates = _read_root_certificates(root_certificates)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.model = model

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self._root_certificates)

    def _generate_request(self, prompts: str | Sequence[str], model: str | None, params: dict) -> pb.GenerateRequest:
        inputs = [prompts] if isinstance(prompts, str) else list(prompts)
        return pb.GenerateRequest(model=self.model if model is None else model, inputs=inputs,
                                  parameters=sampling_parameters(**params))

    def _wait_or_raise(self, exc: grpc.RpcError, attempt: int, deadline: _Deadline, streamed: bool = False) -> float:
        """The pause before retrying a failed call (its `attempt`), or its LlamagridError raised when the retry
        policy says stop. Shared by the sync and async clients' retry loops."""
        error = error_from_rpc(exc, streamed=streamed)
        wait = self.retry.delay_s(attempt, error, deadline.remaining())
        if wait is None:
            raise error from exc
        return wait

    def _deadline(self, timeout: float | None) -> _Deadline:
        return _Deadline(self.timeout if timeout is None else timeout)


# ---------------------------------------------------------------------------------------------------------- sync


class Client(_Base):
    """Blocking client over one grpc channel. `address` defaults to $LLAMAGRID_ADDRESS (else 127.0.0.1:50051),
    `api_key` to $LLAMAGRID_API_KEY; `tls=True` or `root_certificates` (PEM bytes or a path) use TLS. `timeout` is
    each call's overall deadline in seconds, retries included (None = none); methods take `timeout=` too."""

    def __init__(self, address: str | None = None, *, api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | os.PathLike | None = None, timeout: float | None = 120.0,
                 retry: RetryPolicy | None = None, model: str = "", metadata: Sequence[tuple[str, str]] = (),
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        super().__init__(address, api_key, tls=tls, root_certificates=root_certificates, timeout=timeout,
                         retry=retry, model=model, metadata=metadata)
        if self.tls:
            self.channel = grpc.secure_channel(self.address, self._credentials(), options=list(options))
        else:
            self.channel = grpc.insecure_channel(self.address, options=list(options))
        self.stub = pb_grpc.InferenceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: Callable, request: Any, timeout: float | None) -> Any:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return method(request, metadata=self.metadata, timeout=deadline.remaining())
            except grpc.RpcError as exc:
                wait = self._wait_or_raise(exc, attempt, deadline)
            time.sleep(wait)

    def _stream(self, start: Callable[[float | None], Any], timeout: float | None) -> Iterator[Any]:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            attempt += 1
            call = start(deadline.remaining())
            streamed = False
            try:
                for message in call:
                    streamed = True
                    yield message
                return
            except grpc.RpcError as exc:
                wait = self._wait_or_raise(exc, attempt, deadline, streamed=streamed)
            finally:
                call.cancel()  # a no-op once finished; stops the call when the caller abandons the iterator
            time.sleep(wait)

    @overload
    def generate(self, prompts: str, *, model: str | None = ..., timeout: float | None = ...,
                 **params: Any) -> Completion: ...

    @overload
    def generate(self, prompts: Sequence[str], *, model: str | None = ..., timeout: float | None = ...,
                 **params: Any) -> list[Completion]: ...

    def generate(self, prompts, *, model=None, timeout=None, **params):
        """One completion for a prompt (a list of completions for a list of prompts). `params`: max_new_tokens,
        temperature, top_p, top_k, seed, stop (str or list), repetition_penalty, ignore_eos."""
        response = self._unary(self.stub.Generate, self._generate_request(prompts, model, params), timeout)
        outputs = [Completion.from_pb(c) for c in response.outputs]
        return outputs[0] if isinstance(prompts, str) else outputs

    def generate_stream(self, prompts: str | Sequence[str], *, model: str | None = None,
                        timeout: float | None = None, **params: Any) -> Iterator[GenerateChunk]:
        """Chunks as they are generated (all inputs interleaved, tagged with `index`)."""
        request = self._generate_request(prompts, model, params)
        start = lambda remaining: self.stub.GenerateStream(request, metadata=self.metadata, timeout=remaining)
        for chunk in self._stream(start, timeout):
            yield GenerateChunk.from_pb(chunk)

    def count_tokens(self, text: str | None = None, *, messages: Any = None, model: str | None = None,
                     timeout: float | None = None) -> TokenCount:
        """Prompt tokens of `text` (as Generate counts them) or of a conversation `messages` (as Chat builds it)."""
        request = _count_request(self.model if model is None else model, text, messages)
        response = self._unary(self.stub.CountTokens, request, timeout)
        return TokenCount(response.count, response.max_context)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        response = self._unary(self.stub.ListModels, pb.ListModelsRequest(), timeout)
        return [ModelInfo(m.name, m.max_context) for m in response.models]

    def chat(self, *, system: str | None = None, model: str | None = None, timeout: float | None = None,
             **params: Any) -> ChatSession:
        """A multi-turn session (the Chat stream opens on the first `send`). `system` starts the first turn;
        `params` are the default sampling parameters of every turn; `timeout` bounds the whole session (default:
        no deadline, unlike the client's per-call `timeout`)."""
        return ChatSession(self, system=system, model=self.model if model is None else model,
                           params=params, timeout=timeout)


@dataclass
class _Turn:
    messages: list[pb.ChatMessage]
    reply: list[str] = field(default_factory=list)
    events: int = 0


class ChatTurnStream:
    """The events of one chat turn: ChatDelta objects, then one TurnEnd. Safe to resume iterating after an
    exception such as KeyboardInterrupt (e.g. call `cancel()` and keep iterating to reach the CANCELLED end).
    After the end: `text` (the reply) and `end` (the TurnEnd)."""

    def __init__(self, session: ChatSession) -> None:
        self._session = session
        self.end: TurnEnd | None = None
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def cancel(self) -> None:
        self._session.cancel()

    def __iter__(self) -> ChatTurnStream:
        return self

    def __next__(self) -> ChatEvent:
        if self.end is not None:
            raise StopIteration
        event = self._session._next_event()
        if isinstance(event, TurnEnd):
            self.end = event
        else:
            self._parts.append(event.text)
        return event

    def until_end(self) -> TurnEnd:
        """Consume the rest of the turn; returns its TurnEnd."""
        for _ in self:
            pass
        assert self.end is not None
        return self.end


_CLOSE = object()


class ChatSession:
    """One Chat stream. History lives server-side: each `send` sends only its new messages. If the stream fails
    retryably before any event of a turn arrives, it is reopened with the conversation so far (as seen by this
    client) plus the new messages."""

    def __init__(self, client: Client, *, system: str | None, model: str, params: dict[str, Any],
                 timeout: float | None) -> None:
        sampling_parameters(**params)  # validate names now
        self._client = client
        self._model = model
        self._params = params
        self._deadline = _Deadline(timeout)
        self._pending_system = [pb.ChatMessage(role="system", content=system)] if system else []
        self.history: list[pb.ChatMessage] = []  # completed turns: messages sent and assistant replies
        self._requests: queue.Queue | None = None
        self._call: Any = None
        self._turn: _Turn | None = None
        self._turn_params: pb.SamplingParameters | None = None
        self._lock = threading.Lock()

    def _open(self, messages: list[pb.ChatMessage], params: pb.SamplingParameters) -> None:
        self._requests = requests = queue.Queue()
        requests.put(pb.ChatRequest(turn=pb.ChatTurn(messages=messages, parameters=params, model=self._model)))
        self._call = self._client.stub.Chat(iter(requests.get, _CLOSE), metadata=self._client.metadata,
                                            timeout=self._deadline.remaining())

    def send(self, messages: str | Message | Sequence[Message], **params: Any) -> ChatTurnStream:
        """Start a turn (text = one user message); `params` override the session's sampling parameters. The
        previous turn must have ended. Returns the turn's event iterator."""
        if self._turn is not None:
            raise RuntimeError("the previous turn has not ended: iterate it to its TurnEnd first")
        new = self._pending_system + _messages(messages)
        self._pending_system = []
        parameters = sampling_parameters(**{**self._params, **params})
        self._turn, self._turn_params = _Turn(new), parameters
        if self._call is None:  # first turn, or the stream was lost: the conversation so far goes first
            self._open(self.history + new, parameters)
        else:
            self._requests.put(pb.ChatRequest(turn=pb.ChatTurn(messages=new, parameters=parameters)))
        return ChatTurnStream(self)

    def cancel(self) -> None:
        """Stop the reply being generated: its turn ends with finish reason CANCELLED; the session goes on."""
        if self._turn is not None and self._requests is not None:
            self._requests.put(pb.ChatRequest(cancel=pb.CancelTurn()))

    def _next_event(self) -> ChatEvent:
        turn = self._turn
        if turn is None:
            raise RuntimeError("no turn in progress")
        attempt = 1
        while True:
            try:
                message = next(self._call)
                break
            except StopIteration:
                self._abandon()
                raise Unavailable(grpc.StatusCode.UNAVAILABLE, "chat stream ended before the turn did",
                                  streamed=turn.events > 0) from None
            except grpc.RpcError as exc:
                error = error_from_rpc(exc, streamed=turn.events > 0)
                wait = self._client.retry.delay_s(attempt, error, self._deadline.remaining())
                self._abandon()
                if wait is None:
                    self._turn = None
                    raise error from exc
            time.sleep(wait)
            attempt += 1
            self._open(self.history + turn.messages, self._turn_params)
        turn.events += 1
        event = _event_from_pb(message)
        if isinstance(event, TurnEnd):
            self.history += turn.messages + [pb.ChatMessage(role="assistant", content="".join(turn.reply))]
            self._turn = None
        else:
            turn.reply.append(event.text)
        return event

    def _abandon(self) -> None:
        if self._requests is not None:
            self._requests.put(_CLOSE)
        if self._call is not None:
            self._call.cancel()
        self._call = self._requests = None

    def close(self, grace_s: float = 2.0) -> None:
        """End the session: between turns, half-close the stream and give the server up to `grace_s` to finish it;
        a turn in progress is cancelled outright."""
        if self._turn is None and self._call is not None:
            done = threading.Event()
            self._call.add_done_callback(lambda _call: done.set())
            self._requests.put(_CLOSE)
            done.wait(grace_s)
        self._abandon()
        self._turn = None

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------- async


class AsyncClient(_Base):
    """The asyncio twin of Client (grpc.aio): same constructor; methods are coroutines, streams async iterators.
    Create it inside the event loop that uses it."""

    def __init__(self, address: str | None = None, *, api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | os.PathLike | None = None, timeout: float | None = 120.0,
                 retry: RetryPolicy | None = None, model: str = "", metadata: Sequence[tuple[str, str]] = (),
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        super().__init__(address, api_key, tls=tls, root_certificates=root_certificates, timeout=timeout,
                         retry=retry, model=model, metadata=metadata)
        if self.tls:
            self.channel = grpc.aio.secure_channel(self.address, self._credentials(), options=list(options))
        else:
            self.channel = grpc.aio.insecure_channel(self.address, options=list(options))
        self.stub = pb_grpc.InferenceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method: Callable, request: Any, timeout: float | None) -> Any:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await method(request, metadata=self.metadata, timeout=deadline.remaining())
            except grpc.RpcError as exc:
                wait = self._wait_or_raise(exc, attempt, deadline)
            await asyncio.sleep(wait)

    async def _stream(self, start: Callable[[float | None], Any], timeout: float | None) -> AsyncIterator[Any]:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            attempt += 1
            call = start(deadline.remaining())
            streamed = False
            try:
                async for message in call:
                    streamed = True
                    yield message
                return
            except grpc.RpcError as exc:
                wait = self._wait_or_raise(exc, attempt, deadline, streamed=streamed)
            finally:
                call.cancel()
            await asyncio.sleep(wait)

    @overload
    async def generate(self, prompts: str, *, model: str | None = ..., timeout: float | None = ...,
                       **params: Any) -> Completion: ...

    @overload
    async def generate(self, prompts: Sequence[str], *, model: str | None = ..., timeout: float | None = ...,
                       **params: Any) -> list[Completion]: ...

    async def generate(self, prompts, *, model=None, timeout=None, **params):
        response = await self._unary(self.stub.Generate, self._generate_request(prompts, model, params), timeout)
        outputs = [Completion.from_pb(c) for c in response.outputs]
        return outputs[0] if isinstance(prompts, str) else outputs

    async def generate_stream(self, prompts: str | Sequence[str], *, model: str | None = None,
                              timeout: float | None = None, **params: Any) -> AsyncIterator[GenerateChunk]:
        request = self._generate_request(prompts, model, params)
        start = lambda remaining: self.stub.GenerateStream(request, metadata=self.metadata, timeout=remaining)
        async for chunk in self._stream(start, timeout):
            yield GenerateChunk.from_pb(chunk)

    async def count_tokens(self, text: str | None = None, *, messages: Any = None, model: str | None = None,
                           timeout: float | None = None) -> TokenCount:
        request = _count_request(self.model if model is None else model, text, messages)
        response = await self._unary(self.stub.CountTokens, request, timeout)
        return TokenCount(response.count, response.max_context)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        response = await self._unary(self.stub.ListModels, pb.ListModelsRequest(), timeout)
        return [ModelInfo(m.name, m.max_context) for m in response.models]

    def chat(self, *, system: str | None = None, model: str | None = None, timeout: float | None = None,
             **params: Any) -> AsyncChatSession:
        return AsyncChatSession(self, system=system, model=self.model if model is None else model,
                                params=params, timeout=timeout)


def _lost_send(error: LlamagridError) -> bool:
    return error.code == grpc.StatusCode.INTERNAL and error.details == "Internal error from Core"


class AsyncChatSession:
    """The asyncio twin of ChatSession: `send` returns an async iterator of ChatDelta then TurnEnd;
    `await cancel()`; `await close()`."""

    def __init__(self, client: AsyncClient, *, system: str | None, model: str, params: dict[str, Any],
                 timeout: float | None) -> None:
        sampling_parameters(**params)
        self._client = client
        self._model = model
        self._params = params
        self._deadline = _Deadline(timeout)
        self._pending_system = [pb.ChatMessage(role="system", content=system)] if system else []
        self.history: list[pb.ChatMessage] = []
        self._call: Any = None
        self._in_turn = False

    async def _open(self, messages: list[pb.ChatMessage], params: pb.SamplingParameters) -> None:
        self._call = self._client.stub.Chat(metadata=self._client.metadata, timeout=self._deadline.remaining())
        await self._write(pb.ChatRequest(turn=pb.ChatTurn(messages=messages, parameters=params, model=self._model)))

    async def _write(self, request: pb.ChatRequest) -> None:
        # A write to a call the server has already ended fails (sometimes as INTERNAL, hiding the real status);
        # the next read() raises the call's actual status instead.
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            await self._call.write(request)

    def send(self, messages: str | Message | Sequence[Message], **params: Any) -> AsyncIterator[ChatEvent]:
        if self._in_turn:
            raise RuntimeError("the previous turn has not ended: iterate it to its TurnEnd first")
        new = self._pending_system + _messages(messages)
        self._pending_system = []
        parameters = sampling_parameters(**{**self._params, **params})
        self._in_turn = True
        return self._turn(new, parameters)

    async def _turn(self, new: list[pb.ChatMessage], parameters: pb.SamplingParameters) -> AsyncIterator[ChatEvent]:
        try:
            if self._call is None:  # first turn, or the stream was lost: the conversation so far goes first
                await self._open(self.history + new, parameters)
            else:
                await self._write(pb.ChatRequest(turn=pb.ChatTurn(messages=new, parameters=parameters)))
            reply: list[str] = []
            events = 0
            attempt = 1
            while True:
                try:
                    message = await self._call.read()
                except grpc.RpcError as exc:
                    error = error_from_rpc(exc, streamed=events > 0)
                    retry_as = error
                    if events == 0 and _lost_send(error):
                        # grpc.aio replaces the status of a call that the server ended before our write went out
                        # with a local INTERNAL: the turn never reached the server, so try again (bounded by the
                        # policy's attempts) to learn the real status or succeed.
                        retry_as = Unavailable(grpc.StatusCode.UNAVAILABLE, error.details)
                    wait = self._client.retry.delay_s(attempt, retry_as, self._deadline.remaining())
                    self._abandon()
                    if wait is None:
                        raise error from exc
                    await asyncio.sleep(wait)
                    attempt += 1
                    await self._open(self.history + new, parameters)
                    continue
                if message is grpc.aio.EOF:
                    self._abandon()
                    raise Unavailable(grpc.StatusCode.UNAVAILABLE, "chat stream ended before the turn did",
                                      streamed=events > 0)
                events += 1
                event = _event_from_pb(message)
                if isinstance(event, TurnEnd):
                    self.history += new + [pb.ChatMessage(role="assistant", content="".join(reply))]
                    yield event
                    return
                reply.append(event.text)
                yield event
        finally:
            self._in_turn = False

    async def cancel(self) -> None:
        if self._in_turn and self._call is not None:
            await self._write(pb.ChatRequest(cancel=pb.CancelTurn()))

    def _abandon(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self._call = None

    async def close(self, grace_s: float = 2.0) -> None:
        """Between turns, half-close the stream and give the server up to `grace_s` to finish it; a turn in
        progress is cancelled outright."""
        if self._call is not None and not self._in_turn:
            with contextlib.suppress(Exception):  # the stream may already be over
                await self._call.done_writing()
                await asyncio.wait_for(self._call.code(), grace_s)
        self._abandon()

    async def __aenter__(self) -> AsyncChatSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
