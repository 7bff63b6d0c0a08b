"""Router-specific errors; the mapping to gRPC status is common.errors', shared by both services."""

from __future__ import annotations

import math

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from common.errors import (  # noqa: F401 - re-exported for the router
    ModelNotFound,
    ServiceError,
    UpstreamError,
    abort_with,
    handle_errors,
    handle_stream_errors,
)

RETRY_AFTER_TRAILER = "retry-after-ms"


class Unauthenticated(ServiceError):
    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    status = grpc.StatusCode.PERMISSION_DENIED


class NoHealthyWorker(ServiceError):
    status = grpc.StatusCode.UNAVAILABLE


class WorkerLost(ServiceError):
    """A job's workers failed more often than config.retry_attempts allows."""

    status = grpc.StatusCode.UNAVAILABLE


class TierMissing(ServiceError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class SessionOver(ServiceError):
    """A Chat session reached its maximum age or idle time; the client reopens it (UNAVAILABLE is retried)."""

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

    async def abort(self, context: grpc.aio.ServicerContext) -> None:
        """RESOURCE_EXHAUSTED with QuotaFailure/RetryInfo details and a retry-after-ms trailer."""
        status = rpc_status.to_status(rate_limited_status(self))
        trailers = tuple(status.trailing_metadata)
        if self.retry_after_ms is not None:
            trailers += ((RETRY_AFTER_TRAILER, str(self.retry_after_ms)),)
        await context.abort(status.code, status.details, trailing_metadata=trailers)


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


def from_rpc_error(exc: grpc.aio.AioRpcError) -> UpstreamError:
    """A worker's failure as a pass-through error with its code and details."""
    return UpstreamError.from_rpc_error(exc)


def public_error(exc: grpc.aio.AioRpcError, renames: tuple[tuple[str, str], ...] = ()) -> UpstreamError:
    """A worker's failure as the client's error: for INVALID_ARGUMENT, the field it names is rewritten from the
    internal job's name to the public request's (`renames`: (internal prefix, public prefix), first match wins),
    so `job.parameters.top_p: ...` reads `parameters.top_p: ...` and `job.text: ...` reads `inputs[2]: ...`."""
    error = UpstreamError.from_rpc_error(exc)
    if error.status is grpc.StatusCode.INVALID_ARGUMENT:
        for internal, public in renames:
            if error.message.startswith(internal):
                error.message = public + error.message[len(internal):]
                error.args = (error.message,)
                break
    return error
