"""Router errors and the router's one place that turns them (and worker failures) into gRPC status."""

from __future__ import annotations

import functools
import math

import grpc
import structlog
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

log = structlog.get_logger("router.errors")

RETRY_AFTER_TRAILER = "retry-after-ms"


class ServiceError(Exception):
    """An expected failure with the gRPC status the client gets. The message never contains user text."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unauthenticated(ServiceError):
    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    status = grpc.StatusCode.PERMISSION_DENIED


class InvalidRequest(ServiceError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(ServiceError):
    status = grpc.StatusCode.NOT_FOUND


class NoHealthyWorker(ServiceError):
    status = grpc.StatusCode.UNAVAILABLE


class LimiterDown(ServiceError):
    """Redis failed under the fail-closed policy."""

    status = grpc.StatusCode.UNAVAILABLE


class RateLimited(ServiceError):
    """A quota is spent: `retry_after_s` (math.inf when the cost can never fit), `violations` (subject, description)."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float, violations: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.violations = violations

    @property
    def retry_after_ms(self) -> int | None:
        return None if not math.isfinite(self.retry_after_s) else max(1, math.ceil(self.retry_after_s * 1000))


class WorkerError(ServiceError):
    """A worker answered with a non-OK status; passed through with its code and details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details or code.name)
        self.status = code


_CODES = {c: getattr(code_pb2, c.name) for c in grpc.StatusCode if hasattr(code_pb2, c.name)}


def rate_limited_status(error: RateLimited) -> status_pb2.Status:
    """google.rpc.Status with QuotaFailure and (when the wait is finite) RetryInfo details."""
    st = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=error.message)
    quota = error_details_pb2.QuotaFailure(violations=[
        error_details_pb2.QuotaFailure.Violation(subject=s, description=d) for s, d in error.violations])
    st.details.add().Pack(quota)
    if error.retry_after_ms is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(error.retry_after_ms)
        st.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return st


async def abort_with(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    """Abort the RPC with the error's status (raises). RESOURCE_EXHAUSTED carries rich details and a trailer."""
    if isinstance(error, RateLimited):
        status = rpc_status.to_status(rate_limited_status(error))
        trailers = tuple(status.trailing_metadata)
        if error.retry_after_ms is not None:
            trailers += ((RETRY_AFTER_TRAILER, str(error.retry_after_ms)),)
        await context.abort(status.code, status.details, trailing_metadata=trailers)
    await context.abort(error.status, error.message)


def from_rpc_error(exc: grpc.aio.AioRpcError) -> WorkerError:
    """A worker's failure as a pass-through error with its code and details."""
    return WorkerError(exc.code(), exc.details() or "")


async def _abort_for(context: grpc.aio.ServicerContext, error: BaseException, method: str) -> None:
    if isinstance(error, ServiceError):
        await abort_with(context, error)
    if isinstance(error, grpc.aio.AioRpcError):
        await abort_with(context, from_rpc_error(error))
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
