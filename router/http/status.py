"""The one mapping from the router's statuses to HTTP: the code, the error JSON both APIs answer with (OpenAI's
shape, which MLflow's gateway also reads: an `error` object with a `message`), and the retry headers of a 429."""

from __future__ import annotations

import json
import math
import re

import grpc

from router.errors import RETRY_AFTER_TRAILER

HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
    499: "cancelled",
    503: "service_unavailable",
    504: "timeout",
}
GRPC_OF_HTTP = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
                405: grpc.StatusCode.UNIMPLEMENTED, 413: grpc.StatusCode.INVALID_ARGUMENT}
_FIELD = re.compile(r"[A-Za-z_][\w.\[\]]*")


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def error_param(code: grpc.StatusCode, message: str) -> str | None:
    """The request field an INVALID_ARGUMENT message names ("field: problem"), as the client sent it."""
    if code is not grpc.StatusCode.INVALID_ARGUMENT or ": " not in message:
        return None
    field = message.split(": ", 1)[0]
    return field if _FIELD.fullmatch(field) else None


def error_body(status: int, code: grpc.StatusCode, message: str) -> bytes:
    """{"error": {"message", "type", "param", "code"}}: OpenAI's error object. `code` is the gRPC status name (the
    same name a gRPC client of this router sees)."""
    error = {"message": message, "type": ERROR_TYPE.get(status, "server_error"), "param": error_param(code, message),
             "code": code.name.lower()}
    return json.dumps({"error": error}).encode()


def retry_headers(status: int, trailers) -> list[tuple[str, str]]:
    """A 429's wait, as the openai package reads it (retry-after-ms first, then retry-after in whole seconds)."""
    out = []
    for key, value in trailers:
        if key == RETRY_AFTER_TRAILER:
            out.append(("retry-after-ms", value))
            out.append(("retry-after", str(max(1, math.ceil(int(value) / 1000)))))
    if status == 429 and not out:
        out.append(("x-should-retry", "false"))  # no wait makes it fit
    return out
