"""The router as operators run it: internal token to workers, health and reflection, SIGTERM drain, TLS, and
slow clients whose tokens are coalesced without holding anyone else back. Real processes, sockets and Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.internal_auth import INTERNAL_TOKEN_ENV, TOKEN_METADATA
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from ratelimit.redis_server import RedisServer
from router.config import RouterConfig
from router.outbox import Outbox
from tests.service.router_harness import auth, create_keys, router_in_thread
from worker.launch import start_worker

TOKEN = "internal-token-for-tests-0123456789"
GREEDY = pb.SamplingParameters(max_new_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def key(redis_server):
    return create_keys(redis_server.url, {"pro": ("pro", [])})["pro"]


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    """One tiny worker that requires the internal token."""
    proc = start_worker(tiny_model_dir, "--kv-cache-tokens", "4096", "--num-threads", "1",
                        env={INTERNAL_TOKEN_ENV: TOKEN}, stderr=subprocess.DEVNULL)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def router(redis_server, worker, key):
    config = RouterConfig(port=0, workers=worker.address, redis_url=redis_server.url, internal_token=TOKEN,
                          redis_timeout_s=0.5, drain_grace_s=2.0)
    with router_in_thread(config, num_workers=1, probe_key=key) as address:
        yield address


def test_worker_refuses_calls_without_the_internal_token(worker):
    with grpc.insecure_channel(worker.address) as ch:
        internal, public = wpb_grpc.WorkerStub(ch), pb_grpc.InferenceStub(ch)
        job = wpb.WorkerRequest(job=wpb.Job(request_id="x", text="hi", parameters=GREEDY))
        calls = {
            "unary": lambda md: internal.Info(wpb.InfoRequest(), metadata=md, timeout=10),
            "bidi": lambda md: list(internal.Generate(iter([job]), metadata=md, timeout=10)),
            "run": lambda md: list(internal.Run(job.job, metadata=md, timeout=10)),
            "server-stream": lambda md: list(public.GenerateStream(
                pb.GenerateRequest(inputs=["hi"], parameters=GREEDY), metadata=md, timeout=10)),
        }
        for kind, call in calls.items():
            for md in ((), ((TOKEN_METADATA, "wrong-token-wrong-token"),)):
                with pytest.raises(grpc.RpcError) as err:
                    call(md)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, kind
            assert call(((TOKEN_METADATA, TOKEN),)), kind
        # probes need no token
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_router_with_the_token_serves_and_without_it_finds_no_worker(router, redis_server, worker, key):
    with grpc.insecure_channel(router) as ch:
        resp = pb_grpc.InferenceStub(ch).Generate(pb.GenerateRequest(inputs=["hi"], parameters=GREEDY),
                                                  metadata=auth(key), timeout=30)
        assert resp.outputs[0].usage.completion_tokens > 0
    config = RouterConfig(port=0, workers=worker.address, redis_url=redis_server.url, redis_timeout_s=0.5,
                          drain_grace_s=0.0)
    with router_in_thread(config) as address, grpc.insecure_channel(address) as ch:
        time.sleep(1.0)  # the pool's first Info call is refused, so the worker never turns healthy
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.InferenceStub(ch).Generate(pb.GenerateRequest(inputs=["hi"], parameters=GREEDY),
                                               metadata=auth(key), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no healthy worker" in err.value.details()


def test_router_health_and_reflection(router):
    with grpc.insecure_channel(router) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "llamagrid.v1.Inference"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                    timeout=10))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"llamagrid.v1.Inference", "grpc.health.v1.Health"} <= names


def test_sigterm_drains_in_flight_streams_and_refuses_new_ones(redis_server, worker, key, tmp_path):
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "router", "--workers", worker.address, "--port", "0", "--port-file", str(port_file),
         "--redis-url", redis_server.url, "--drain-grace", "30"],
        env={**os.environ, INTERNAL_TOKEN_ENV: TOKEN}, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        address = f"127.0.0.1:{port_file.read_text()}"
        long = pb.SamplingParameters(max_new_tokens=150, temperature=0.0, ignore_eos=True)
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            grpc.channel_ready_future(ch).result(timeout=10)
            deadline = time.monotonic() + 30
            while True:  # until the router's pool has the worker
                try:
                    stub.CountTokens(pb.CountTokensRequest(text="x"), metadata=auth(key), timeout=5)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            stream = stub.GenerateStream(pb.GenerateRequest(inputs=["tell me"], parameters=long),
                                         metadata=auth(key), timeout=60)
            chunks = [next(stream)]
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            try:  # the listening socket closes at once, so a probe sees NOT_SERVING or nothing at all
                health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError) as err:  # a new call during the drain is refused
                stub.Generate(pb.GenerateRequest(inputs=["hi"], parameters=GREEDY), metadata=auth(key), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            chunks += list(stream)  # ... while the in-flight stream runs to its end
        assert chunks[-1].finish_reason == pb.LENGTH
        assert sum(len(c.token_ids) for c in chunks) == 150
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tls_client_port(redis_server, worker, key, tmp_path):
    trustme = pytest.importorskip("trustme")  # a dev dependency; the import only fails outside `.[dev]`
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(str(key_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    config = RouterConfig(port=0, workers=worker.address, redis_url=redis_server.url, internal_token=TOKEN,
                          tls_cert=cert_path, tls_key=key_path, drain_grace_s=0.0)
    with router_in_thread(config, num_workers=1) as address:
        port = address.rsplit(":", 1)[1]
        creds = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
        with grpc.secure_channel(f"localhost:{port}", creds) as ch:
            models = pb_grpc.InferenceStub(ch).ListModels(pb.ListModelsRequest(), metadata=auth(key), timeout=10)
            assert len(models.models) == 1
        with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as err:
            pb_grpc.InferenceStub(ch).ListModels(pb.ListModelsRequest(), metadata=auth(key), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_outbox_merges_deltas_per_index_and_keeps_ends_in_order():
    def delta(text, ids):
        return wpb.WorkerEvent(delta=wpb.TokenDelta(text=text, token_ids=ids))

    async def body():
        box = Outbox()
        box.put_event(0, delta("a", [1]))
        box.put_event(1, delta("x", [9]))
        box.put_event(0, delta("b", [2]))
        box.put_event(0, wpb.WorkerEvent(finished=wpb.Finished()))
        box.put_event(0, delta("late", [3]))  # a new delta after an end starts a new message
        box.put("marker")
        assert len(box) == 5 and box.merged == 1
        out = [await box.get() for _ in range(5)]
        assert [(i, e.delta.text if not isinstance(e, str) and e.HasField("delta") else e) for i, e in out[:2]] == [
            (0, "ab"), (1, "x")]
        assert list(out[0][1].delta.token_ids) == [1, 2]
        assert out[2][1].HasField("finished") and out[3][1].delta.text == "late" and out[4] == (None, "marker")
        box.put_event(1, delta("y", [8]))  # the taken delta of index 1 is not merged into any more
        assert (await box.get())[1].delta.text == "y"

    asyncio.run(body())


def test_a_stalled_client_gets_coalesced_tokens_and_holds_nobody_back(router, key):
    """A client that stops reading: its tokens pile up in the router as a few merged messages (the stream's flow
    control window is kept small so the router feels the back-pressure), while another client is served."""
    params = pb.SamplingParameters(max_new_tokens=300, temperature=0.0, ignore_eos=True)
    request = pb.GenerateRequest(inputs=["a story"], parameters=params)
    small_window = [("grpc.http2.lookahead_bytes", 256), ("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(router) as fast_ch:
        reference = list(pb_grpc.InferenceStub(fast_ch).GenerateStream(request, metadata=auth(key), timeout=120))
    with grpc.insecure_channel(router, options=small_window) as slow_ch, grpc.insecure_channel(router) as fast_ch:
        slow = pb_grpc.InferenceStub(slow_ch).GenerateStream(request, metadata=auth(key), timeout=120)
        first = next(slow)  # then stall
        others_done = threading.Event()

        def other_client():
            for _ in range(3):
                out = pb_grpc.InferenceStub(fast_ch).Generate(pb.GenerateRequest(inputs=["hi"], parameters=GREEDY),
                                                              metadata=auth(key), timeout=60)
                assert out.outputs[0].usage.completion_tokens > 0
            others_done.set()

        t = threading.Thread(target=other_client)
        t.start()
        assert others_done.wait(60), "another client was held back by a stalled one"
        time.sleep(2.0)  # the stalled stream's worker keeps generating into the router meanwhile
        rest = [first, *slow]
        t.join()
    text = "".join(c.text for c in rest)
    ids = [t for c in rest for t in c.token_ids]
    assert ids == [t for c in reference for t in c.token_ids] and text == "".join(c.text for c in reference)
    assert len(ids) == 300
    assert len(rest) < len(ids) // 2, f"{len(rest)} messages for {len(ids)} tokens: nothing was coalesced"
