"""The router in-process over real gRPC, in front of real worker processes and a real redis-server."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from ratelimit.limiter import connect
from ratelimit.redis_server import RedisServer
from router.auth import Authenticator, FailureCounter
from router.config import RouterConfig
from router.errors import ServiceError
from router.keys import ApiKeyStore
from router.relay import Relay
from tests.service.router_harness import auth, create_keys, router_in_thread, start_workers

WORKER_ARGS = ("--kv-cache-tokens", "2048", "--num-threads", "1")
TIERS = """
[tiers.pro]
requests_per_minute = 600
tokens_per_minute = 400000

[tiers.tiny]
requests_per_minute = 1
tokens_per_minute = 100000
request_burst = 2
"""
PARAMS = pb.SamplingParameters(max_new_tokens=4, temperature=0.0)


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def worker_logs(tmp_path_factory):
    base = tmp_path_factory.mktemp("router-worker-logs")
    return [base / f"worker{i}.stderr" for i in range(2)]


@pytest.fixture(scope="module")
def workers(tiny_model_dir, worker_logs):
    """Two tiny workers (stderr to `worker_logs`); the last test kills the second."""

    procs = start_workers(tiny_model_dir, worker_logs, *WORKER_ARGS)
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def dead_address():
    """An address nothing listens on (a port bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def keys(redis_server):
    """Plaintext keys by name: pro, tiny, revoked, restricted (may use only another model)."""
    out = create_keys(redis_server.url, {"pro": ("pro", []), "tiny": ("tiny", []), "revoked": ("pro", []),
                                         "restricted": ("pro", ["some-other-model"])})

    async def revoke():
        client = connect(redis_server.url, timeout_s=1.0)
        try:
            store = ApiKeyStore(client)
            record = await store.authenticate(out["revoked"])
            assert await store.revoke(record.key_id)
        finally:
            await client.aclose()

    asyncio.run(revoke())
    return out


@pytest.fixture(scope="module")
def router(redis_server, workers, keys, tmp_path_factory):
    """The router on its own event loop in a thread; yields its address once both workers are routable."""
    tiers = tmp_path_factory.mktemp("tiers") / "tiers.toml"
    tiers.write_text(TIERS)
    config = RouterConfig(port=0, workers=",".join(w.address for w in workers), redis_url=redis_server.url,
                          tiers_path=tiers, redis_timeout_s=0.5, failover_wait_s=2.0)
    with router_in_thread(config, num_workers=2, probe_key=keys["pro"]) as address:
        yield address


def _auth(key: str) -> tuple[tuple[str, str], ...]:
    return auth(key)


@pytest.fixture(scope="module")
def stub(router):
    with grpc.insecure_channel(router) as ch:
        yield pb_grpc.InferenceStub(ch)


def test_missing_and_revoked_keys_are_unauthenticated(stub, keys):
    req = pb.GenerateRequest(inputs=["hi"], parameters=PARAMS)
    for metadata in ((), (("authorization", "Basic abc"),), _auth("lg_nope"), _auth(keys["revoked"])):
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(req, metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_generate_returns_completions_and_ratelimit_metadata(stub, keys):
    req = pb.GenerateRequest(inputs=["hello", "the cat"], parameters=PARAMS)
    resp, call = stub.Generate.with_call(req, metadata=_auth(keys["pro"]), timeout=30)
    assert len(resp.outputs) == 2
    for out in resp.outputs:
        assert out.usage.completion_tokens == len(out.token_ids) > 0
        assert out.usage.prompt_tokens > 0
        assert out.finish_reason in (pb.LENGTH, pb.EOS, pb.STOP)
    md = dict(call.initial_metadata())
    assert md["x-ratelimit-limit-requests"] == "600"
    assert int(md["x-ratelimit-remaining-requests"]) < 600
    assert int(md["x-ratelimit-remaining-tokens"]) < 400000
    assert md["x-ratelimit-reset-requests"].endswith("ms") and md["x-ratelimit-reset-tokens"].endswith("ms")


def test_generate_stream_interleaves_indexed_chunks(stub, keys):
    req = pb.GenerateRequest(inputs=["one", "two two"], parameters=PARAMS)
    chunks = list(stub.GenerateStream(req, metadata=_auth(keys["pro"]), timeout=30))
    finished = {c.index: c for c in chunks if c.finish_reason}
    assert set(finished) == {0, 1}
    unary = stub.Generate(req, metadata=_auth(keys["pro"]), timeout=30)
    for i in (0, 1):
        ids = [t for c in chunks if c.index == i for t in c.token_ids]
        assert finished[i].usage.completion_tokens == len(ids) > 0
        assert ids == list(unary.outputs[i].token_ids)
        assert "".join(c.text for c in chunks if c.index == i) == unary.outputs[i].text
        assert finished[i].token_ids  # the last tokens ride with the end (Finished.last_delta)


def test_chat_two_turns_on_one_session(stub, keys):
    turn_done = threading.Event()
    requests = [pb.ChatRequest(turn=pb.ChatTurn(messages=[pb.ChatMessage(role="user", content="hi")],
                                                parameters=PARAMS)),
                pb.ChatRequest(turn=pb.ChatTurn(messages=[pb.ChatMessage(role="user", content="more")],
                                                parameters=PARAMS))]

    def gen():
        yield requests[0]
        assert turn_done.wait(30)
        yield requests[1]

    ends = []
    for event in stub.Chat(gen(), metadata=_auth(keys["pro"]), timeout=60):
        if event.HasField("end"):
            ends.append(event.end)
            turn_done.set()
    assert len(ends) == 2
    # the second turn's prompt contains the whole first turn (history) plus the new message
    assert ends[1].usage.prompt_tokens > ends[0].usage.prompt_tokens + ends[0].usage.completion_tokens


def test_chat_cancel_ends_the_turn_cancelled(stub, keys):
    cancel_now = threading.Event()
    params = pb.SamplingParameters(max_new_tokens=1000, temperature=0.0, ignore_eos=True)

    def gen():
        yield pb.ChatRequest(turn=pb.ChatTurn(messages=[pb.ChatMessage(role="user", content="talk")],
                                              parameters=params))
        assert cancel_now.wait(30)
        yield pb.ChatRequest(cancel=pb.CancelTurn())

    ends = []
    for event in stub.Chat(gen(), metadata=_auth(keys["pro"]), timeout=60):
        if event.HasField("delta"):
            cancel_now.set()
        else:
            ends.append(event.end)
    assert [e.finish_reason for e in ends] == [pb.CANCELLED]
    assert ends[0].usage.completion_tokens < 1000


def test_count_tokens_and_list_models(stub, keys):
    models = stub.ListModels(pb.ListModelsRequest(), metadata=_auth(keys["pro"]), timeout=10).models
    assert len(models) == 1 and models[0].max_context > 0
    count = stub.CountTokens(pb.CountTokensRequest(text="hello world"), metadata=_auth(keys["pro"]), timeout=10)
    assert count.count > 0 and count.max_context == models[0].max_context


def test_tiny_tier_third_request_is_resource_exhausted(stub, keys):
    req = pb.GenerateRequest(inputs=["x"], parameters=PARAMS)
    for _ in range(2):
        stub.Generate(req, metadata=_auth(keys["tiny"]), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(req, metadata=_auth(keys["tiny"]), timeout=30)
    e = err.value
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(e.trailing_metadata())
    assert int(trailers["retry-after-ms"]) > 0
    status = rpc_status.from_call(e)
    kinds = {d.type_url.rsplit("/", 1)[-1] for d in status.details}
    assert {"google.rpc.RetryInfo", "google.rpc.QuotaFailure"} <= kinds
    info = error_details_pb2.RetryInfo()
    next(d for d in status.details if d.Is(info.DESCRIPTOR)).Unpack(info)
    assert info.retry_delay.ToMilliseconds() > 0


def test_unknown_model_is_not_found(stub, keys):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(model="no-such-model", inputs=["x"], parameters=PARAMS),
                      metadata=_auth(keys["pro"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_bad_parameters_pass_through_as_invalid_argument(stub, keys):
    bad = pb.SamplingParameters(max_new_tokens=4, temperature=-1.0)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(inputs=["x"], parameters=bad), metadata=_auth(keys["pro"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in err.value.details()


def test_model_outside_the_keys_allow_list_is_permission_denied(stub, keys):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(inputs=["x"], parameters=PARAMS), metadata=_auth(keys["restricted"]),
                      timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_auth_failures_per_peer_turn_into_resource_exhausted():
    now = [0.0]
    counter = FailureCounter(3, window_s=60.0, clock=lambda: now[0])
    for _ in range(3):
        assert counter.blocked_for("p") == 0.0
        counter.record("p")
    assert counter.blocked_for("p") == pytest.approx(60.0)
    assert counter.blocked_for("q") == 0.0
    now[0] = 30.0
    assert counter.blocked_for("p") == pytest.approx(30.0)
    now[0] = 60.5
    assert counter.blocked_for("p") == 0.0

    class Ctx:
        def peer(self):
            return "ipv4:10.0.0.1:5555"

        def invocation_metadata(self):
            return ()

    auth = Authenticator(store=None, max_failures=2)  # no key lookup happens without a bearer token

    async def attempt():
        try:
            await auth.authenticate(Ctx())
        except ServiceError as e:
            return e.status

    codes = [asyncio.run(attempt()) for _ in range(3)]
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED]


def test_client_cancel_aborts_the_worker_sequence(stub, keys, worker_logs):
    params = pb.SamplingParameters(max_new_tokens=1000, temperature=0.0, ignore_eos=True)
    stream = stub.GenerateStream(pb.GenerateRequest(inputs=["go on"], parameters=params), timeout=60,
                                 metadata=(*_auth(keys["pro"]), ("x-request-id", "cancel-test")))
    next(stream)
    stream.cancel()
    deadline = time.monotonic() + 10
    while not any('"request_aborted"' in line and '"cancel-test/0"' in line
                  for path in worker_logs for line in path.read_text(errors="replace").splitlines()):
        assert time.monotonic() < deadline, "the worker did not abort the sequence after the client cancelled"
        time.sleep(0.05)
    assert not any('"request_finished"' in line and '"cancel-test/0"' in line
                   for path in worker_logs for line in path.read_text(errors="replace").splitlines())


def test_unavailable_worker_before_first_token_is_retried(workers, dead_address):
    """A worker that refuses the connection is swapped for another one before any token was sent."""

    class FakePool:
        metadata = ()

        def __init__(self, channels):
            self.channels = channels
            self.picked = []

        def pick(self, model, exclude=frozenset(), prefer=None):
            for address in (dead_address, workers[0].address):
                if address not in exclude:
                    self.picked.append(address)
                    return types.SimpleNamespace(address=address), None
            return None

        def stub(self, address):
            return wpb_grpc.WorkerStub(self.channels[address])

        def acquire(self, address, pending_tokens=0):
            return types.SimpleNamespace(release=lambda: None)

    class Ctx:
        def time_remaining(self):
            return 30.0

    async def body():
        channels = {a: grpc.aio.insecure_channel(a) for a in (dead_address, workers[0].address)}
        try:
            pool = FakePool(channels)
            relay = Relay(RouterConfig(retry_attempts=1), pool)
            model = (await pool.stub(workers[0].address).Info(wpb.InfoRequest(), timeout=5)).model
            job = wpb.Job(request_id="retry-test", model=model, text="hi", parameters=PARAMS)
            events = [e async for e in relay.events(job, Ctx())]
            return pool.picked, events
        finally:
            for ch in channels.values():
                await ch.close()

    picked, events = asyncio.run(body())
    assert picked == [dead_address, workers[0].address]
    assert events[-1].HasField("finished") and events[-1].finished.usage.completion_tokens > 0


def test_router_main_serves_until_sigterm(workers, tmp_path):
    """`python -m router` with an embedded redis-server: serves (a keyless call is refused), exits 0 on SIGTERM."""
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "router", "--workers", workers[0].address, "--port", "0",
                             "--port-file", str(port_file)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with grpc.insecure_channel(f"127.0.0.1:{port_file.read_text()}") as ch:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.InferenceStub(ch).ListModels(pb.ListModelsRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _served_by(worker_logs, request_id: str) -> list[int]:
    """Indexes of the workers whose log shows `request_id` finished or aborted."""
    return [i for i, path in enumerate(worker_logs)
            if any(f'"{request_id}"' in line and ('"request_finished"' in line or '"request_aborted"' in line)
                   for line in path.read_text(errors="replace").splitlines())]


def test_worker_deaths_chat_moves_generate_retries_mid_stream_loss_is_unavailable(stub, keys, workers, worker_logs):
    """Runs last: kills both workers. (1) A Chat session whose worker dies between turns continues on the other
    worker (the router carries the transcript). (2) Requests keep landing on the live worker. (3) A stream whose
    worker dies after its first token, with no worker left to resume it on, ends with UNAVAILABLE saying so once
    config.failover_wait_s has passed."""
    turn_done = threading.Event()
    killed = []

    def gen():
        yield pb.ChatRequest(turn=pb.ChatTurn(messages=[pb.ChatMessage(role="user", content="hi")], parameters=PARAMS))
        assert turn_done.wait(30)
        deadline = time.monotonic() + 10
        while not (served := _served_by(worker_logs, "chat-move/0")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        workers[served[0]].proc.kill()
        workers[served[0]].proc.wait()
        killed.append(served[0])
        yield pb.ChatRequest(turn=pb.ChatTurn(messages=[pb.ChatMessage(role="user", content="more")],
                                              parameters=PARAMS))

    ends = []
    for event in stub.Chat(gen(), metadata=(*_auth(keys["pro"]), ("x-request-id", "chat-move")), timeout=60):
        if event.HasField("end"):
            ends.append(event.end)
            turn_done.set()
    assert len(ends) == 2 and ends[1].usage.completion_tokens > 0
    survivor = 1 - killed[0]
    assert _served_by(worker_logs, "chat-move/1") == [survivor]
    # the second turn's prompt still holds the first turn: the transcript moved with the session
    assert ends[1].usage.prompt_tokens > ends[0].usage.prompt_tokens + ends[0].usage.completion_tokens

    req = pb.GenerateRequest(inputs=["a", "b", "c", "d"], parameters=PARAMS)
    for _ in range(4):  # whether or not the pool has noticed yet, requests land on the live worker
        resp = stub.Generate(req, metadata=_auth(keys["pro"]), timeout=30)
        assert all(o.usage.completion_tokens > 0 for o in resp.outputs)

    long = pb.SamplingParameters(max_new_tokens=1000, temperature=0.0, ignore_eos=True)
    stream = stub.GenerateStream(pb.GenerateRequest(inputs=["go"], parameters=long), metadata=_auth(keys["pro"]),
                                 timeout=60)
    next(stream)
    workers[survivor].proc.kill()
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no healthy worker could take over" in err.value.details()
