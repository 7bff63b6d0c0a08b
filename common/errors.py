"""Service errors and the one place that turns them into gRPC status."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time

import grpc
import structlog

log = structlog.get_logger("common.errors")


class ServiceError(Exception):
    """An expected failure with the gRPC status the client gets. The message never contains user text."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    async def abort(self, context: grpc.aio.ServicerContext) -> None:
        """End the RPC with this error's status (raises, as context.abort does)."""
        await context.abort(self.status, self.message)


class UpstreamError(ServiceError):
    """A downstream gRPC call (router -> worker) failed; passed through with its code and details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details or code.name)
        self.status = code

    @classmethod
    def from_rpc_error(cls, exc: grpc.aio.AioRpcError) -> UpstreamError:
        return cls(exc.code(), exc.details() or "")


class InvalidRequest(ServiceError):
    """A request field is out of range; the message names the field."""

    status = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class ModelNotFound(ServiceError):
    status = grpc.StatusCode.NOT_FOUND


class EngineUnavailable(ServiceError):
    """The engine is not serving (warming up, draining, or stopped)."""

    status = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(ServiceError):
    """The server is not in a state to do this (e.g. a feature it runs without)."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class DuplicateRequest(ServiceError):
    status = grpc.StatusCode.ALREADY_EXISTS


class DeadlineExceeded(ServiceError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


async def abort_with(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    """Abort the RPC with the error's status and message (raises, as context.abort does)."""
    await error.abort(context)


async def _abort_for(context: grpc.aio.ServicerContext, error: BaseException, method: str) -> None:
    """Abort with the status that `error` maps to; unexpected errors are logged once and become INTERNAL."""
    if isinstance(error, ServiceError):
        await abort_with(context, error)
    if isinstance(error, grpc.aio.AioRpcError):
        await abort_with(context, UpstreamError.from_rpc_error(error))
    log.exception("handler_failed", method=method)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


def _status_of(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, ServiceError):
        return error.status
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code()
    return grpc.StatusCode.INTERNAL


def _aborted_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    with contextlib.suppress(Exception):
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return code
    return grpc.StatusCode.UNKNOWN


def _observe(servicer, method, code: grpc.StatusCode, started: float) -> None:
    """Report one finished call to the servicer's optional `rpc_observer(method_name, code, seconds)` (metrics)."""
    observer = getattr(servicer, "rpc_observer", None)
    if observer is not None:
        with contextlib.suppress(Exception):
            observer(method.__name__, code, time.monotonic() - started)


def handle_errors(method):
    """Decorate a unary grpc.aio handler: ServiceError -> its status; anything else -> INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        started, code = time.monotonic(), grpc.StatusCode.OK
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            code = _aborted_code(context)
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as e:
            code = _status_of(e)
            _observe(self, method, code, started)  # before the status goes out: a client that saw it sees it counted
            code = None
            await _abort_for(context, e, method.__name__)
        finally:
            if code is not None:
                _observe(self, method, code, started)

    return wrapper


def handle_stream_errors(method):
    """Decorate a streaming (async generator) grpc.aio handler with the same mapping."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        started, code = time.monotonic(), grpc.StatusCode.OK
        try:
            async for item in method(self, request, context):
                yield item
        except grpc.aio.AbortError:
            code = _aborted_code(context)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as e:
            code = _status_of(e)
            _observe(self, method, code, started)  # before the status goes out (see handle_errors)
            code = None
            await _abort_for(context, e, method.__name__)
        finally:
            if code is not None:
                _observe(self, method, code, started)

    return wrapper
