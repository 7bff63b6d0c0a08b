"""Service errors and the one place that turns them into gRPC status."""

from __future__ import annotations

import functools

import grpc
import structlog

log = structlog.get_logger("worker.errors")


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


def handle_errors(method):
    """Decorate a unary grpc.aio handler: ServiceError -> its status; anything else -> INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort_for(context, e, method.__name__)

    return wrapper


def handle_stream_errors(method):
    """Decorate a streaming (async generator) grpc.aio handler with the same mapping."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            async for item in method(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort_for(context, e, method.__name__)

    return wrapper
