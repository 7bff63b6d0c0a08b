"""Request bytes that do not parse get INVALID_ARGUMENT with a plain message, from a real worker process (its
Worker API, health and reflection) and from the router (in front of a fake worker): unary requests and any message
of a streamed one. Other calls in flight go on."""

from __future__ import annotations

import asyncio
import json
import queue
import threading

import grpc
import pytest

from common.internal_auth import MIN_TOKEN_CHARS, InternalTokenInterceptor, token_metadata
from common.rpc_guard import RequestGuard
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from router.config import RouterConfig
from tests.support.fake_model import Script
from tests.support.router import auth, create_keys, router_in_thread
from tests.support.waits import wait_until

BAD = b"\xff\xff"  # a truncated varint: no message type parses it
INFERENCE = "/llamagrid.v1.Inference/"
WORKER = "/llamagrid.worker.v1.Worker/"
LONG = pb.SamplingParameters(max_new_tokens=3000, ignore_eos=True)

# (method path, request type, response streamed)
PUBLIC_UNARY = [
    (INFERENCE + "Generate", "llamagrid.v1.GenerateRequest", False),
    (INFERENCE + "GenerateStream", "llamagrid.v1.GenerateRequest", True),
    (INFERENCE + "CountTokens", "llamagrid.v1.CountTokensRequest", False),
    (INFERENCE + "ListModels", "llamagrid.v1.ListModelsRequest", False),
]
WORKER_UNARY = [
    ("/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest", False),
    ("/grpc.health.v1.Health/Watch", "grpc.health.v1.HealthCheckRequest", True),
    (WORKER + "Run", "llamagrid.worker.v1.Job", True),
    (WORKER + "Info", "llamagrid.worker.v1.InfoRequest", False),
    (WORKER + "Load", "llamagrid.worker.v1.LoadRequest", False),
    (WORKER + "CountTokens", "llamagrid.v1.CountTokensRequest", False),
]


def _message(type_name: str) -> str:
    return f"request: not a valid {type_name} message"


def _call_raw(channel: grpc.Channel, path: str, streamed: bool, metadata=()) -> grpc.RpcError:
    if streamed:
        call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            list(call(BAD, metadata=metadata, timeout=30))
    else:
        call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            call(BAD, metadata=metadata, timeout=30)
    return err.value


class Outgoing:
    """A client stream fed from the test: put() bytes, close() ends it (and frees grpc's sending thread)."""

    def __init__(self) -> None:
        self._items: queue.Queue = queue.Queue()

    def put(self, item: bytes) -> None:
        self._items.put(item)

    def close(self) -> None:
        self._items.put(None)

    def __iter__(self):
        while (item := self._items.get()) is not None:
            yield item


def _turn(content: str, parameters: pb.SamplingParameters) -> bytes:
    turn = pb.ChatTurn(messages=[pb.ChatMessage(role="user", content=content)], parameters=parameters)
    return pb.ChatRequest(turn=turn).SerializeToString()


def _chat_with_bad_message(channel: grpc.Channel, when: str, metadata=()) -> tuple[grpc.RpcError, int]:
    """A Chat whose client sends BAD `first`, after one finished turn (`after_turn`) or while a long reply streams
    (`during_turn`). Returns the error and the number of events received before it."""
    chat = channel.stream_stream(INFERENCE + "Chat", request_serializer=None,
                                 response_deserializer=pb.ChatEvent.FromString)
    out = Outgoing()
    if when == "first":
        out.put(BAD)
    elif when == "after_turn":
        out.put(_turn("hello", pb.SamplingParameters(max_new_tokens=3, ignore_eos=True)))
    else:
        out.put(_turn("go on", LONG))
    received = 0
    try:
        with pytest.raises(grpc.RpcError) as err:
            for event in chat(iter(out), metadata=metadata, timeout=60):
                received += 1
                if (when == "after_turn" and event.HasField("end")) or (when == "during_turn" and received == 3):
                    out.put(BAD)
    finally:
        out.close()
    return err.value, received


def _wait_idle(internal: wpb_grpc.WorkerStub, timeout_s: float = 30.0) -> None:
    """Until the worker runs and waits on nothing (a rejected stream's generation was stopped)."""

    def idle():
        load = internal.Load(wpb.LoadRequest(), timeout=5)
        return load.num_running == 0 and load.num_waiting == 0 and load

    wait_until(idle, "the worker to run and wait on nothing", timeout_s)


class Background:
    """A 200-token stream running in a thread while the test sends garbage; result() is its full output. On a
    router: GenerateStream; on a worker: Worker.Run."""

    def __init__(self, channel: grpc.Channel, metadata=(), on_worker: bool = False) -> None:
        params = pb.SamplingParameters(max_new_tokens=200, temperature=0.0, ignore_eos=True)
        if on_worker:
            req = wpb.Job(request_id="guard-background", text="steady", parameters=params)
            stream = channel.unary_stream(WORKER + "Run", request_serializer=wpb.Job.SerializeToString,
                                          response_deserializer=wpb.WorkerEvent.FromString)
        else:
            req = pb.GenerateRequest(inputs=["steady"], parameters=params)
            stream = channel.unary_stream(INFERENCE + "GenerateStream",
                                          request_serializer=pb.GenerateRequest.SerializeToString,
                                          response_deserializer=pb.GenerateChunk.FromString)
        self.first = threading.Event()
        self._ids: list[int] = []
        self._error: BaseException | None = None

        def run():
            try:
                for message in stream(req, metadata=metadata, timeout=120):
                    if on_worker:
                        message = message.delta if message.HasField("delta") else message.finished.last_delta
                    self._ids.extend(message.token_ids)
                    self.first.set()
            except BaseException as exc:  # noqa: BLE001 - reported by result()
                self._error = exc
                self.first.set()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert self.first.wait(60), "the background stream never started"

    def result(self) -> list[int]:
        """Every token id it received."""
        self._thread.join(120)
        assert not self._thread.is_alive() and self._error is None, self._error
        return self._ids


# --- the worker -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,type_name,streamed", WORKER_UNARY)
def test_worker_unary_request_that_does_not_parse(channel, path, type_name, streamed):
    err = _call_raw(channel, path, streamed)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == _message(type_name)


@pytest.mark.parametrize("when", ["first", "during_job"])
def test_worker_generate_message_that_does_not_parse(channel, internal, when):
    background = Background(channel, on_worker=True)
    generate = channel.stream_stream(WORKER + "Generate", request_serializer=None,
                                     response_deserializer=wpb.WorkerEvent.FromString)
    out = Outgoing()
    if when == "first":
        out.put(BAD)
    else:
        out.put(wpb.WorkerRequest(job=wpb.Job(request_id="guard-job", text="go on", parameters=LONG))
                .SerializeToString())
    received = 0
    try:
        with pytest.raises(grpc.RpcError) as err:
            for _ in generate(iter(out), timeout=60):
                received += 1
                if received == 3:
                    out.put(BAD)  # where a cancel would go
    finally:
        out.close()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details() == _message("llamagrid.worker.v1.WorkerRequest")
    assert (received > 0) == (when != "first")
    assert len(background.result()) == 200  # the call beside it went on to its end
    _wait_idle(internal)


def test_worker_reflection_stream_that_does_not_parse(channel):
    """A handler without the services' error mapping (grpc's reflection) is answered by the guard itself."""
    info = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                 request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        list(info(iter([BAD]), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == _message("grpc.reflection.v1alpha.ServerReflectionRequest")


def test_internal_token_is_checked_before_the_request_is_parsed():
    token = "t" * MIN_TOKEN_CHARS

    async def info(request, context):
        return wpb.InfoResponse(model="m")

    async def main():
        server = grpc.aio.server(interceptors=[InternalTokenInterceptor(token), RequestGuard()])
        handler = grpc.unary_unary_rpc_method_handler(info, request_deserializer=wpb.InfoRequest.FromString,
                                                      response_serializer=wpb.InfoResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("llamagrid.worker.v1.Worker",
                                                                              {"Info": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = ch.unary_unary(WORKER + "Info", request_serializer=None, response_deserializer=None)
                codes = []
                for metadata in ((), token_metadata(token)):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call(BAD, metadata=metadata, timeout=10)
                    codes.append(err.value.code())
                ok = await call(wpb.InfoRequest().SerializeToString(), metadata=token_metadata(token), timeout=10)
                return codes, wpb.InfoResponse.FromString(ok)
        finally:
            await server.stop(None)

    codes, ok = asyncio.run(main())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT]
    assert ok.model == "m"


def test_worker_still_serves_after_garbage(internal):
    events = list(internal.Run(wpb.Job(request_id="guard-after", text="hi",
                                       parameters=pb.SamplingParameters(max_new_tokens=2)), timeout=60))
    assert events[-1].finished.usage.completion_tokens == 2


# --- the router -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_worker(module_fakes):
    return module_fakes.start(Script(token_delay_s=0.003))  # the 200-token background stream runs 0.6 s


@pytest.fixture(scope="module")
def router(redis_server, fake_worker):
    key = create_keys(redis_server.url, {"pro": ("pro", [])})["pro"]
    config = RouterConfig(port=0, workers=fake_worker.address, redis_url=redis_server.url, redis_timeout_s=0.5)
    with router_in_thread(config, num_workers=1, probe_key=key) as address, grpc.insecure_channel(address) as ch:
        yield ch, auth(key)


@pytest.mark.parametrize("path,type_name,streamed", PUBLIC_UNARY)
def test_router_unary_request_that_does_not_parse(router, path, type_name, streamed):
    channel, metadata = router
    err = _call_raw(channel, path, streamed, metadata)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == _message(type_name)


@pytest.mark.parametrize("when", ["first", "after_turn", "during_turn"])
def test_router_chat_message_that_does_not_parse(router, fake_worker, when):
    channel, metadata = router
    background = Background(channel, metadata)
    err, received = _chat_with_bad_message(channel, when, (*metadata, ("x-request-id", f"guard-{when}")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details() == _message("llamagrid.v1.ChatRequest")
    assert (received > 0) == (when != "first")
    assert len(background.result()) == 200
    fake_worker.wait_idle()  # the worker's side of the rejected session was stopped too
    if when == "during_turn":
        assert fake_worker.job("guard-during_turn/0").outcome in ("call_cancelled", "cancelled")


def test_router_still_serves_after_garbage(router):
    channel, metadata = router
    generate = channel.unary_unary(INFERENCE + "Generate", request_serializer=pb.GenerateRequest.SerializeToString,
                                   response_deserializer=pb.GenerateResponse.FromString)
    resp = generate(pb.GenerateRequest(inputs=["hi"], parameters=pb.SamplingParameters(max_new_tokens=2)),
                    metadata=metadata, timeout=60)
    assert resp.outputs[0].token_ids


def test_worker_log_has_only_json_and_no_handler_failure(worker_process, worker_log):
    """Rejected garbage is not an internal error: no handler_failed, no grpc 'Unexpected' record, and every line
    of the worker's stderr (debug level, grpc's records included) is JSON."""
    events = [json.loads(line) for line in worker_log.read_text().splitlines()]
    assert events
    assert not [e for e in events if e["event"] == "handler_failed" or "Unexpected" in e.get("message", "")]
