"""The router as operators run it: the internal token between routers and workers, health and reflection, SIGTERM
drain, TLS. A real worker for the worker's own token check; fake workers (which check the token the same way)
behind the routers; real router processes, sockets and Redis."""

from __future__ import annotations

import os

import grpc
import pytest
import requests
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.internal_auth import INTERNAL_TOKEN_ENV, TOKEN_METADATA
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from router.config import RouterConfig
from tests.support.fake_model import Script
from tests.support.router import RouterProcess, auth, create_keys, router_in_thread, serve_router, wait_routable
from tests.support.waits import wait_until
from tests.support.workers import INTERNAL_TOKEN as TOKEN

GREEDY = pb.SamplingParameters(max_new_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def key(redis_server):
    return create_keys(redis_server.url, {"pro": ("pro", [])})["pro"]


@pytest.fixture(scope="module")
def worker(module_fakes):
    """A fake worker that requires the internal token."""
    return module_fakes.start(internal_token=TOKEN)


@pytest.fixture(scope="module")
def router(redis_server, worker, key):
    config = RouterConfig(port=0, workers=worker.address, redis_url=redis_server.url, internal_token=TOKEN,
                          redis_timeout_s=0.5, drain_grace_s=2.0)
    with router_in_thread(config, num_workers=1, probe_key=key) as address:
        yield address


def test_worker_refuses_calls_without_the_internal_token(token_worker):
    with grpc.insecure_channel(token_worker.address) as ch:
        internal = wpb_grpc.WorkerStub(ch)
        job = wpb.WorkerRequest(job=wpb.Job(request_id="x", text="hi", parameters=GREEDY))
        calls = {
            "unary": lambda md: internal.Info(wpb.InfoRequest(), metadata=md, timeout=10),
            "unary-count": lambda md: internal.CountTokens(pb.CountTokensRequest(text="hi"), metadata=md,
                                                           timeout=10),
            "bidi": lambda md: list(internal.Generate(iter([job]), metadata=md, timeout=10)),
            "server-stream": lambda md: list(internal.Run(job.job, metadata=md, timeout=10)),
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
    assert all(j.metadata.get(TOKEN_METADATA) == TOKEN for j in worker.jobs)
    config = RouterConfig(port=0, workers=worker.address, redis_url=redis_server.url, redis_timeout_s=0.5,
                          drain_grace_s=0.0)
    refused_before = worker.refused.count("/llamagrid.worker.v1.Worker/Info")
    with router_in_thread(config) as address, grpc.insecure_channel(address) as ch:
        # the pool's first Info call is refused, so the worker never turns healthy
        worker.wait_for(lambda w: w.refused.count("/llamagrid.worker.v1.Worker/Info") > refused_before,
                        "the token-less router's Info call to be refused")
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.InferenceStub(ch).Generate(pb.GenerateRequest(inputs=["hi"], parameters=GREEDY),
                                               metadata=auth(key), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no healthy worker" in err.value.details()


def test_router_health_and_reflection(router):
    with grpc.insecure_channel(router) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", "llamagrid.v1.Inference"):  # (the router re-checks its pool every 0.5 s)
            request = health_pb2.HealthCheckRequest(service=service)
            wait_until(lambda request=request: health.Check(request, timeout=10).status == serving,
                       f"the router's health of {service!r} to be SERVING")
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                    timeout=10))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"llamagrid.v1.Inference", "grpc.health.v1.Health"} <= names


def test_sigterm_drains_in_flight_streams_and_refuses_new_ones(redis_server, fakes, key, tmp_path):
    worker = fakes.start(Script(token_delay_s=0.01), internal_token=TOKEN)  # 150 tokens: 1.5 s
    router = RouterProcess(tmp_path / "router.stderr", "--workers", worker.address, "--redis-url", redis_server.url,
                           "--drain-grace", "30", env={**os.environ, INTERNAL_TOKEN_ENV: TOKEN})
    try:
        wait_routable(router.address, key)
        long = pb.SamplingParameters(max_new_tokens=150, temperature=0.0, ignore_eos=True)
        with grpc.insecure_channel(router.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            stream = stub.GenerateStream(pb.GenerateRequest(inputs=["tell me"], parameters=long),
                                         metadata=(*auth(key), ("x-request-id", "draining")), timeout=60)
            chunks = [next(stream)]
            router.proc.terminate()
            router.wait_event("router_draining")
            try:  # the listening socket closes at once, so a probe sees NOT_SERVING or nothing at all: refused
                health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            except grpc.RpcError as exc:  # (a call that reaches gRPC's server as it stops is cancelled by gRPC)
                assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            with pytest.raises(grpc.RpcError) as err:  # a new call during the drain is refused
                stub.Generate(pb.GenerateRequest(inputs=["hi"], parameters=GREEDY), metadata=auth(key), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not worker.job("draining/0").ended  # (the stream was still in flight during those checks)
            chunks += list(stream)  # ... while the in-flight stream runs to its end
        assert chunks[-1].finish_reason == pb.LENGTH
        assert sum(len(c.token_ids) for c in chunks) == 150
        assert router.proc.wait(30) == 0
    finally:
        router.stop()


def test_tls_client_port(redis_server, worker, key, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(str(key_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    config = RouterConfig(port=0, workers=worker.address, redis_url=redis_server.url, internal_token=TOKEN,
                          tls_cert=cert_path, tls_key=key_path, drain_grace_s=0.0, http_port=0)
    with serve_router(config, num_workers=1) as router:
        address = router.address
        port = address.rsplit(":", 1)[1]
        # the HTTP API speaks HTTPS with the same certificate
        http_port = router.http_url.rsplit(":", 1)[1]
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        reply = requests.get(f"https://localhost:{http_port}/v1/models", verify=str(ca_file), timeout=10,
                             headers={"authorization": f"Bearer {key}"})
        assert reply.status_code == 200 and len(reply.json()["data"]) == 1
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{http_port}/v1/models", timeout=5)
        creds = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
        with grpc.secure_channel(f"localhost:{port}", creds) as ch:
            models = pb_grpc.InferenceStub(ch).ListModels(pb.ListModelsRequest(), metadata=auth(key), timeout=10)
            assert len(models.models) == 1
        with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as err:
            pb_grpc.InferenceStub(ch).ListModels(pb.ListModelsRequest(), metadata=auth(key), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

