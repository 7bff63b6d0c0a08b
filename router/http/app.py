"""The HTTP edge's ASGI app (FastAPI): OpenAI's /v1/chat/completions, /v1/completions and /v1/models, MosaicML's
/{model}/v1/predict and /predict_stream, liveness and readiness, the OpenAPI schema at /openapi.json.

Each call runs through RouterServicer's own call bodies (admission, relay, failover, settlement, the request log)
with an HttpContext; its result is written by the request's Exchange straight to the connection from the request's
own task, as the worker's messages arrive (no queue or task per message). Errors before the first byte get their
HTTP status; after it (a stream cut short), one last error event in the stream's own format."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from common.errors import ServiceError, UpstreamError
from protos.llamagrid.v1 import inference_pb2 as pb
from router.calls import begin_call, call_ended
from router.http.context import HttpAbort, HttpContext
from router.http.exchange import Exchange
from router.http.mosaic_api import PredictRequest, predict_exchange
from router.http.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_exchange,
    completion_exchange,
    models_json,
)
from router.http.status import GRPC_OF_HTTP, error_body, http_status, retry_headers
from router.metrics import RouterMetrics
from router.servicer import RouterServicer

log = structlog.get_logger("router.http")

JSON = "application/json"


def _peer(request: Request) -> str:
    client = request.client
    return f"ipv4:{client.host}:{client.port}" if client is not None else "unknown"


def _route(request: Request) -> str:
    route = request.scope.get("route")
    return f"{request.method} {route.path}" if route is not None else f"{request.method} (unmatched)"


def _fields(loc) -> str:
    """A pydantic error location as the client wrote the field: ("body", "messages", 0, "content") ->
    messages[0].content."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not (isinstance(part, str) and part.startswith(("function-", "union["))):  # pydantic's own steps
            out += f".{part}" if out else str(part)
    return out or "body"


def _simple(status: int, body: bytes, headers: list[tuple[str, str]] = ()) -> Response:
    return Response(body, status_code=status, media_type=JSON, headers=dict(headers))


class Edge:
    """The app's state: the servicer whose call bodies it runs, the metrics, and whether the router is ready."""

    def __init__(self, servicer: RouterServicer, metrics: RouterMetrics, ready: Callable[[], bool]) -> None:
        self.servicer, self.metrics, self.ready = servicer, metrics, ready

    def call(self, request: Request, make: Callable[[], Exchange]) -> Response:
        """The response that runs the request's exchange (`make()` translates the body; a field it refuses is a 400
        at once)."""
        try:
            exchange = make()
        except ServiceError as error:
            return self.refused(request, error)
        return CallResponse(self, request, exchange, "stream" if exchange.stream else "unary")

    def refused(self, request: Request, error: ServiceError) -> Response:
        """A request refused before it reached a call body (a field out of range)."""
        status = http_status(error.status)
        self.metrics.http_request(_route(request), status, 0.0)
        return _simple(status, error_body(status, error.status, error.message))


class CallResponse(Response):
    """Runs a call body when Starlette sends the response, in the request's task: `kind` is "stream" (chunks
    written as they come), "unary" or "models"."""

    def __init__(self, edge: Edge, request: Request, exchange: Exchange | None, kind: str) -> None:
        self.edge, self.request, self.exchange, self.kind = edge, request, exchange, kind
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        started = time.monotonic()
        request, exchange, servicer = self.request, self.exchange, self.edge.servicer
        route = _route(request)
        headers = request.headers
        ctx = HttpContext(headers.get("authorization"), headers.get("x-request-id"), _peer(request))
        record = begin_call(route, ctx)
        state = {"started": False, "finished": False, "status": 200}
        task = asyncio.current_task()
        watcher = asyncio.get_running_loop().create_task(self._watch(receive, task, state))

        async def start(status: int, media_type: str, extra=()) -> None:
            state["started"], state["status"] = True, status
            out = [(b"content-type", media_type.encode()), (b"x-request-id", record.request_id.encode())]
            out += [(k.encode(), v.encode()) for k, v in (*ctx.headers, *extra)]
            if media_type == "text/event-stream":
                out += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
            await send({"type": "http.response.start", "status": status, "headers": out})

        async def write(chunk: pb.GenerateChunk) -> None:
            if not state["started"]:
                exchange.begin(record.request_id, record.model)
                await start(200, exchange.media_type)
            await send({"type": "http.response.body", "body": exchange.chunk(chunk), "more_body": True})

        ctx.write = write
        code = grpc.StatusCode.OK
        try:
            try:
                if self.kind == "stream":
                    await servicer.generate_stream(exchange.request, ctx, record)
                    if not state["started"]:
                        exchange.begin(record.request_id, record.model)
                        await start(200, exchange.media_type)
                    state["finished"] = True
                    await send({"type": "http.response.body", "body": exchange.end(), "more_body": False})
                else:
                    if self.kind == "models":
                        body, media_type = models_json(await servicer.list_models(ctx, record)), JSON
                    else:
                        response = await servicer.generate(exchange.request, ctx, record)
                        exchange.begin(record.request_id, record.model)
                        body, media_type = exchange.unary(response), JSON
                    state["finished"] = True
                    await start(200, media_type)
                    await send({"type": "http.response.body", "body": body, "more_body": False})
            except ServiceError as error:
                await error.abort(ctx)  # (raises HttpAbort: the trailers a gRPC client would get, e.g. retry-after-ms)
            except grpc.aio.AioRpcError as exc:
                await UpstreamError.from_rpc_error(exc).abort(ctx)
        except HttpAbort as abort:
            code = abort.code
            await self._fail(send, start, state, abort.code, abort.details, abort.trailers)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            if not state.get("disconnected"):
                raise
            task.uncancel()  # the client left (the watcher cancelled the call): nothing more to send
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("handler_failed", method=route, request_id=record.request_id)
            await self._fail(send, start, state, code, "internal error", ())
        finally:
            state["finished"] = True
            watcher.cancel()
            call_ended(code)
            status = 499 if code is grpc.StatusCode.CANCELLED and state.get("disconnected") else state["status"]
            self.edge.metrics.http_request(route, status, time.monotonic() - started)

    async def _fail(self, send, start, state, code: grpc.StatusCode, details: str, trailers) -> None:
        status = http_status(code)
        body = (self.exchange.error(status, code, details) if self.exchange is not None
                else error_body(status, code, details))
        try:
            if not state["started"]:
                await start(status, JSON, retry_headers(status, trailers))
                await send({"type": "http.response.body", "body": body, "more_body": False})
            else:  # the stream had begun (200 sent): its last event says what went wrong
                state["status"] = status
                await send({"type": "http.response.body", "body": self.exchange.stream_error(body),
                            "more_body": False})
        except OSError:  # the client is gone
            pass

    @staticmethod
    async def _watch(receive, task: asyncio.Task, state: dict) -> None:
        """Cancel the call when its client disconnects before the response is complete (the worker stops)."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not state["finished"]:
                    state["disconnected"] = True
                    task.cancel()
                return


def build_app(edge: Edge) -> FastAPI:
    app = FastAPI(title="llamagrid", version="1", description="OpenAI- and MosaicML-compatible HTTP API of a "
                  "llamagrid router: the same keys, limits, routing and failover as its gRPC API.",
                  docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        field = _fields(first.get("loc", ()))
        message = "the body is not valid JSON" if first.get("type") == "json_invalid" else first.get("msg", "invalid")
        body = error_body(400, grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}")
        edge.metrics.http_request(_route(request), 400, 0.0)
        return _simple(400, body)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = GRPC_OF_HTTP.get(exc.status_code, grpc.StatusCode.INVALID_ARGUMENT)
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        edge.metrics.http_request(_route(request), exc.status_code, 0.0)
        return Response(error_body(exc.status_code, code, message), status_code=exc.status_code, media_type=JSON)

    # ---- OpenAI

    @app.post("/v1/chat/completions", summary="OpenAI chat completions (streamed as server-sent events)")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return edge.call(request, lambda: chat_exchange(body))

    @app.post("/v1/completions", summary="OpenAI completions (streamed as server-sent events)")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return edge.call(request, lambda: completion_exchange(body))

    @app.get("/v1/models", summary="OpenAI models: those the router's healthy workers serve")
    async def models(request: Request) -> Response:
        return CallResponse(edge, request, None, "models")

    # ---- MosaicML

    @app.post("/{model}/v1/predict", summary="MosaicML predict: one output per input")
    async def predict(model: str, body: PredictRequest, request: Request) -> Response:
        return edge.call(request, lambda: predict_exchange(model, body, stream=False))

    @app.post("/{model}/v1/predict_stream", summary="MosaicML predict, streamed as newline-delimited JSON")
    async def predict_stream(model: str, body: PredictRequest, request: Request) -> Response:
        return edge.call(request, lambda: predict_exchange(model, body, stream=True))

    # ---- probes

    @app.get("/health/live", summary="Liveness: the router's process serves")
    async def live() -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)

    @app.get("/health/ready", summary="Readiness: at least one healthy worker, and not draining")
    async def ready() -> Response:
        if edge.ready():
            return Response(b'{"status":"ready"}', media_type=JSON)
        return Response(b'{"status":"not ready"}', status_code=503, media_type=JSON)

    return app
