"""The internal token between routers and workers: a worker configured with one refuses calls that lack it.

The token comes from a file (`--internal-token-file`, how Kubernetes and compose mount secrets) or the
LLAMAGRID_INTERNAL_TOKEN environment variable — never from a command-line value, which `ps` would show. Routers
send it as `x-llamagrid-internal-token` metadata on every worker call. Health checks (and reflection) stay open so
probes and load balancers work without it.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path

import grpc
import structlog

from common.log_throttle import Throttle

log = structlog.get_logger("common.internal_auth")

INTERNAL_TOKEN_ENV = "LLAMAGRID_INTERNAL_TOKEN"
TOKEN_METADATA = "x-llamagrid-internal-token"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
MIN_TOKEN_CHARS = 16
REFUSAL_LOG_INTERVAL_S = 10.0  # anyone who reaches the port can cause refusals: one line per interval at most


def read_internal_token(token_file: Path | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The configured token: the file's content (stripped) if given, else the environment variable, else None.
    Raises ValueError for an unreadable file or a token shorter than MIN_TOKEN_CHARS."""
    env = os.environ if environ is None else environ
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"internal token file {token_file} cannot be read: {exc.strerror}") from exc
        source = f"internal token file {token_file}"
    else:
        token = env.get(INTERNAL_TOKEN_ENV, "").strip()
        if not token:
            return None
        source = INTERNAL_TOKEN_ENV
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{source}: the internal token must be at least {MIN_TOKEN_CHARS} characters")
    return token


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata a router adds to each worker call (empty without a token)."""
    return ((TOKEN_METADATA, token),) if token else ()


def _denied_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that fails with UNAUTHENTICATED."""
    message = "this worker requires the cluster's internal token"

    async def deny_unary(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny_unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(deny_unary, **kw)


class InternalTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health/reflection unless it carries the token (compared in constant time)."""

    def __init__(self, token: str, log_interval_s: float = REFUSAL_LOG_INTERVAL_S) -> None:
        self._token = token.encode()
        self._refusals = Throttle(log_interval_s)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        presented = next((v for k, v in handler_call_details.invocation_metadata or () if k == TOKEN_METADATA), "")
        if isinstance(presented, str):
            presented = presented.encode()
        if hmac.compare_digest(presented, self._token):
            return handler
        self._refusals.warn(log, "internal_token_refused", method=handler_call_details.method,
                            present=bool(presented))
        return _denied_handler(handler)
