"""The router in-process over real gRPC, in front of fake workers and a real redis-server: keys, limits, model
routing, retries and worker deaths. (What the model generates through it: test_end_to_end.py, on real workers.)"""

from __future__ import annotations

import asyncio
import socket
import threading
import types

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from router.auth import Authenticator, FailureCounter
from router.config import RouterConfig
from router.errors import ServiceError
from router.relay import Relay
from tests.support.router import RouterProcess, admin, auth, config_for, create_keys, router_in_thread, serve_router
from tests.support.waits import wait_until

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
def workers(module_fakes):
    return module_fakes.start_many(2)


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

    async def revoke(client, store):
        record = await store.authenticate(out["revoked"])
        assert await store.revoke(record.key_id)

    admin(redis_server.url, revoke)
    return out


@pytest.fixture(scope="module")
def tiers_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiers") / "tiers.toml"
    path.write_text(TIERS)
    return path


def _config(redis_url: str, workers, tiers_path) -> RouterConfig:
    return config_for(workers, redis_url, tiers_path, failover_wait_s=2.0)


@pytest.fixture(scope="module")
def stub(redis_server, workers, keys, tiers_path):
    """A stub of the router (on its own event loop in a thread), once both workers are routable."""
    with router_in_thread(_config(redis_server.url, workers, tiers_path), num_workers=2,
                          probe_key=keys["pro"]) as address, grpc.insecure_channel(address) as ch:
        yield pb_grpc.InferenceStub(ch)


def test_missing_and_revoked_keys_are_unauthenticated(stub, keys):
    req = pb.GenerateRequest(inputs=["hi"], parameters=PARAMS)
    for metadata in ((), (("authorization", "Basic abc"),), auth("lg_nope"), auth(keys["revoked"])):
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(req, metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_generate_returns_completions_and_ratelimit_metadata(stub, keys, workers):
    req = pb.GenerateRequest(inputs=["hello", "the cat"], parameters=PARAMS)
    resp, call = stub.Generate.with_call(req, metadata=(*auth(keys["pro"]), ("x-request-id", "two-inputs")),
                                         timeout=30)
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
    # one job per input, for the key's tenant, each with the client's deadline
    jobs = sorted((j for w in workers for j in w.jobs_matching("two-inputs/")), key=lambda j: j.request_id)
    assert [(j.request_id, j.job.text, j.tenant, j.tenant_weight) for j in jobs] == [
        ("two-inputs/0", "hello", "tenant-pro", 1), ("two-inputs/1", "the cat", "tenant-pro", 1)]
    # (gRPC rounds a deadline up on the wire)
    assert all(j.deadline_unix_ms > 0 and 0 < j.time_remaining_s < 31 for j in jobs), [j.summary() for j in jobs]


def test_tiny_tier_third_request_is_resource_exhausted(stub, keys):
    req = pb.GenerateRequest(inputs=["x"], parameters=PARAMS)
    for _ in range(2):
        stub.Generate(req, metadata=auth(keys["tiny"]), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(req, metadata=auth(keys["tiny"]), timeout=30)
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
                      metadata=auth(keys["pro"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_model_outside_the_keys_allow_list_is_permission_denied(stub, keys):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(inputs=["x"], parameters=PARAMS), metadata=auth(keys["restricted"]),
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

    authenticator = Authenticator(store=None, max_failures=2)  # no key lookup happens without a bearer token

    async def attempt():
        try:
            await authenticator.authenticate(Ctx())
        except ServiceError as e:
            return e.status

    codes = [asyncio.run(attempt()) for _ in range(3)]
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED]


def test_unavailable_worker_before_first_token_is_retried(workers, dead_address):
    """A worker that refuses the connection is swapped for another one before any token was sent."""

    class FakePool:
        metadata = ()
        cache_routing = False

        def __init__(self, channels):
            self.channels = channels
            self.picked = []

        def pick(self, model, exclude=frozenset(), prefer=None, prompt=None):
            for address in (dead_address, workers[0].address):
                if address not in exclude:
                    self.picked.append(address)
                    return types.SimpleNamespace(address=address), None
            return None

        def stub(self, address):
            return wpb_grpc.WorkerStub(self.channels[address])

        def acquire(self, address, pending_tokens=0):
            return types.SimpleNamespace(release=lambda: None)

        def default_max_new_tokens(self, model):
            return 16

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
    router = RouterProcess(tmp_path / "router.stderr", "--workers", workers[0].address)
    try:
        with grpc.insecure_channel(router.address) as ch:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.InferenceStub(ch).ListModels(pb.ListModelsRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        assert router.stop(20) == 0


def _served_by(workers, request_id: str) -> list[int]:
    """Indexes of the workers that finished or aborted `request_id`."""
    return [i for i, w in enumerate(workers) if any(j.request_id == request_id and j.ended for j in w.jobs)]


def test_worker_deaths_chat_moves_generate_retries_mid_stream_loss_is_unavailable(fakes, redis_server, keys,
                                                                                  tiers_path):
    """Both workers die, as processes do (every stream reset). (1) A Chat session whose worker dies between turns
    continues on the other worker (the router carries the transcript). (2) Requests keep landing on the live
    worker. (3) A stream whose worker dies after its first token, with no worker left to resume it on, ends with
    UNAVAILABLE saying so once config.failover_wait_s has passed."""
    workers = fakes.start_many(2)
    turn_done = threading.Event()
    killed = []
    with serve_router(_config(redis_server.url, workers, tiers_path), num_workers=2) as router, \
            grpc.insecure_channel(router.address) as ch:
        stub = pb_grpc.InferenceStub(ch)

        def gen():
            yield pb.ChatRequest(turn=pb.ChatTurn(messages=[pb.ChatMessage(role="user", content="hi")],
                                                  parameters=PARAMS))
            assert turn_done.wait(30)
            served = wait_until(lambda: _served_by(workers, "chat-move/0"), "the first turn's worker")
            workers[served[0]].stop()
            killed.append(served[0])
            yield pb.ChatRequest(turn=pb.ChatTurn(messages=[pb.ChatMessage(role="user", content="more")],
                                                  parameters=PARAMS))

        ends = []
        for event in stub.Chat(gen(), metadata=(*auth(keys["pro"]), ("x-request-id", "chat-move")), timeout=60):
            if event.HasField("end"):
                ends.append(event.end)
                turn_done.set()
        assert len(ends) == 2 and ends[1].usage.completion_tokens > 0
        survivor = 1 - killed[0]
        assert _served_by(workers, "chat-move/1") == [survivor]
        # the second turn's prompt still holds the first turn: the transcript moved with the session
        assert ends[1].usage.prompt_tokens > ends[0].usage.prompt_tokens + ends[0].usage.completion_tokens
        moved = workers[survivor].job("chat-move/1")
        assert len(moved.history_token_ids) == ends[0].usage.prompt_tokens + ends[0].usage.completion_tokens + 1

        req = pb.GenerateRequest(inputs=["a", "b", "c", "d"], parameters=PARAMS)
        for _ in range(4):  # whether or not the pool has noticed yet, requests land on the live worker
            resp = stub.Generate(req, metadata=auth(keys["pro"]), timeout=30)
            assert all(o.usage.completion_tokens > 0 for o in resp.outputs)

        long = pb.SamplingParameters(max_new_tokens=1000, temperature=0.0, ignore_eos=True)
        stream = stub.GenerateStream(pb.GenerateRequest(inputs=["go"], parameters=long),
                                     metadata=auth(keys["pro"]), timeout=60)
        next(stream)
        workers[survivor].stop()
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no healthy worker could take over" in err.value.details()
