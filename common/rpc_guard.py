"""Requests whose bytes do not parse get INVALID_ARGUMENT with a plain message, on the router and on the worker.

Left to grpc.aio, a deserializer failure ends the call with UNKNOWN and a Python class name, and grpc logs it as a
plain-text traceback. `RequestGuard` (a server interceptor) takes deserialization over from grpc:

- unary requests: the handler is registered without a deserializer (it receives the raw bytes) and the wrapper
  parses them; a failure aborts INVALID_ARGUMENT before the servicer runs;
- streamed requests (Chat, Worker.Generate): the deserializer is replaced by one that raises `MalformedMessage`
  (an `InvalidRequest`, so the services' error mapping answers INVALID_ARGUMENT) wherever the handler reads the
  stream. A handler that reads in a task of its own may lose that exception (its reader ends and the session looks
  half-closed), so the guard also remembers the failure for the call: a reader task that dies of it cancels the
  handler, and a handler that ends without having answered INVALID_ARGUMENT itself is answered that way.

Responses are written by the wrapper (`context.write`) exactly as grpc's own loop would, so the per-message cost
is the parse that grpc would do anyway; handlers resolved once are cached per method.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect

import grpc

from common.errors import InvalidRequest

_CALL: contextvars.ContextVar[_StreamCall | None] = contextvars.ContextVar("llamagrid_rpc_guard_call", default=None)


class MalformedMessage(InvalidRequest):
    """A request message whose bytes are not a valid message of its type."""

    def __init__(self, type_name: str) -> None:
        super().__init__("request", f"not a valid {type_name} message")


def _type_name(deserializer, method: str) -> str:
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", None) or f"{method} request"


class _StreamCall:
    """One streamed-request call: its handler task and the first malformed message's error, once seen."""

    __slots__ = ("task", "context", "error", "cancelled_handler")

    def __init__(self, task: asyncio.Task | None, context: grpc.aio.ServicerContext) -> None:
        self.task = task
        self.context = context
        self.error: MalformedMessage | None = None
        self.cancelled_handler = False

    def failed(self, error: MalformedMessage) -> None:
        if self.error is None:
            self.error = error
        reader = asyncio.current_task()
        if reader is not None and reader is not self.task:
            reader.add_done_callback(self._reader_done)

    def _reader_done(self, reader: asyncio.Task) -> None:
        # The reader task died of the malformed message and nobody else took the error from it: the handler
        # would go on as if the client had half-closed, so it is stopped and the call answered by the wrapper.
        if reader.cancelled() or not isinstance(reader.exception(), MalformedMessage):
            return
        if self.context.done():  # the handler has answered already (its status is on its way)
            return
        if self.task is not None and not self.task.done() and not self.cancelled_handler:
            self.cancelled_handler = True
            self.task.cancel()


def _stream_deserializer(parse, type_name: str):
    def deserialize(raw: bytes):
        try:
            return parse(raw)
        except Exception:  # whatever the parser raises, the bytes are not a message of this type
            error = MalformedMessage(type_name)
            call = _CALL.get()
            if call is not None:
                call.failed(error)
            raise error from None

    return deserialize


async def _answer(context: grpc.aio.ServicerContext, error: MalformedMessage) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)


def _guard_unary_request(handler: grpc.RpcMethodHandler, type_name: str) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer
    kw = {"request_deserializer": None, "response_serializer": handler.response_serializer}

    if handler.response_streaming:
        behavior = handler.unary_stream

        async def unary_stream(raw: bytes, context):
            try:
                request = parse(raw)
            except Exception:
                await _answer(context, MalformedMessage(type_name))
            if inspect.iscoroutinefunction(behavior):
                await behavior(request, context)
                return
            async for response in behavior(request, context):
                await context.write(response)

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)

    behavior = handler.unary_unary

    async def unary_unary(raw: bytes, context):
        try:
            request = parse(raw)
        except Exception:
            await _answer(context, MalformedMessage(type_name))
        return await behavior(request, context)

    return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)


def _guard_stream_request(handler: grpc.RpcMethodHandler, type_name: str) -> grpc.RpcMethodHandler:
    kw = {"request_deserializer": _stream_deserializer(handler.request_deserializer, type_name),
          "response_serializer": handler.response_serializer}
    response_streaming = handler.response_streaming
    behavior = handler.stream_stream if response_streaming else handler.stream_unary

    async def run(request_iterator, context):
        call = _StreamCall(asyncio.current_task(), context)
        token = _CALL.set(call)
        response = None
        try:
            if not response_streaming:
                response = await behavior(request_iterator, context)
            elif inspect.iscoroutinefunction(behavior):
                await behavior(request_iterator, context)
            else:
                async for message in behavior(request_iterator, context):
                    await context.write(message)
        except asyncio.CancelledError:
            if not call.cancelled_handler or context.done():
                raise
            call.task.uncancel()
        except MalformedMessage:  # a handler without the services' error mapping: answered below
            pass
        finally:
            _CALL.reset(token)
        if call.error is not None and not context.done():
            await _answer(context, call.error)
        return response

    if response_streaming:
        return grpc.stream_stream_rpc_method_handler(run, **kw)
    return grpc.stream_unary_rpc_method_handler(run, **kw)


def guard_handler(handler: grpc.RpcMethodHandler | None, method: str) -> grpc.RpcMethodHandler | None:
    """`handler` with deserialization failures answered INVALID_ARGUMENT; unchanged when there is nothing to
    guard (no handler, no deserializer, or a synchronous handler, which grpc runs in a thread pool)."""
    if handler is None or handler.request_deserializer is None:
        return handler
    behavior = (handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream)
    if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
        return handler
    type_name = _type_name(handler.request_deserializer, method)
    if handler.request_streaming:
        return _guard_stream_request(handler, type_name)
    return _guard_unary_request(handler, type_name)


class RequestGuard(grpc.aio.ServerInterceptor):
    """Answers INVALID_ARGUMENT to request messages that do not parse (see the module's docstring). Put it last
    in the interceptor list, so that interceptors before it (the internal token) refuse a call before any parse."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler | None]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = guard_handler(handler, method)
        if handler is not None:
            self._cache[method] = (handler, guarded)
        return guarded
