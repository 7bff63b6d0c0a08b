"""What an HTTP request looks like to the router's call bodies: the part of grpc.aio's ServicerContext they use."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import grpc

BEARER = "Bearer "


class HttpAbort(Exception):
    """A call body ended the request with a status (what context.abort does on gRPC); mapped by router.http.status."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(details)
        self.code, self.details, self.trailers = code, details, trailers


class HttpContext:
    """One HTTP request as a servicer context: its key (`Authorization: Bearer <key>`, or the bare key MosaicML's
    clients send) and `x-request-id` as invocation metadata, the peer, no deadline (HTTP clients set none: the client
    closing the connection cancels the call), the rate-limit headers kept for the response, and `write` for a
    streamed call's messages."""

    __slots__ = ("_metadata", "_peer", "_deadline", "headers", "write", "_code")

    def __init__(self, authorization: str | None, request_id: str | None, peer: str,
                 write: Callable[[object], Awaitable[None]] | None = None, timeout_s: float | None = None) -> None:
        metadata = []
        if authorization:
            value = authorization.strip()
            if value[: len(BEARER)].lower() != BEARER.lower():  # MosaicML's clients send the bare key
                value = BEARER + value
            metadata.append(("authorization", value))
        if request_id:
            metadata.append(("x-request-id", request_id))
        self._metadata = tuple(metadata)
        self._peer = peer
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.headers: tuple[tuple[str, str], ...] = ()
        self.write = write
        self._code: grpc.StatusCode | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def send_initial_metadata(self, metadata) -> None:
        self.headers = tuple(metadata)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        self._code = code
        raise HttpAbort(code, details, tuple(trailing_metadata or ()))

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def done(self) -> bool:
        return self._code is not None
