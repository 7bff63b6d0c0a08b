"""Prometheus /metrics of a real worker process and an in-process router, scraped over HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.ports import free_port
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from ratelimit.redis_server import RedisServer
from router.config import RouterConfig
from tests.service.router_harness import auth, create_keys, serve_router

CANARY = "canary-7f3e9 purple elephant sings"
CANARY_KEY = "lg_canary7f3e9_purple-elephant-key"  # well-formed bearer token, no such key
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


def scrape(port: int) -> dict[str, list]:
    """Metric family name -> its samples (name, labels, value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        body = resp.read().decode()
    assert CANARY not in body and CANARY_KEY not in body  # no request text or key anywhere, label values included
    return {f.name: f.samples for f in text_string_to_metric_families(body)}


def value(families: dict[str, list], sample_name: str, **labels: str) -> float:
    return sum(s.value for samples in families.values() for s in samples
               if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))


def all_label_values(families: dict[str, list]) -> set[str]:
    return {v for samples in families.values() for s in samples for v in s.labels.values()}


@pytest.fixture(scope="module")
def worker(tiny_model_dir, tmp_path_factory):
    """A worker process with --metrics-port 0; yields (grpc address, metrics port)."""
    base = tmp_path_factory.mktemp("metrics-worker")
    port_file = base / "port"
    log = open(base / "worker.stderr", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "worker", "--model", str(tiny_model_dir), "--port", "0",
                             "--port-file", str(port_file), "--metrics-port", "0", "--kv-cache-tokens", "2048",
                             "--num-threads", "1"], env=dict(os.environ), stderr=log)
    try:
        deadline = time.monotonic() + 300
        while not port_file.exists():
            assert proc.poll() is None, f"worker exited with {proc.returncode}"
            assert time.monotonic() < deadline, "worker never served"
            time.sleep(0.05)
        yield f"127.0.0.1:{int(port_file.read_text())}", int((base / "port.metrics").read_text())
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_worker_metrics(worker, tiny_model_dir):
    address, metrics_port = worker
    before = scrape(metrics_port)
    assert value(before, "llamagrid_worker_kv_blocks_total") > 0
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        stub.Generate(pb.GenerateRequest(inputs=[CANARY, CANARY + " again"], parameters=PARAMS), timeout=60)
        chunks = list(stub.GenerateStream(pb.GenerateRequest(inputs=[CANARY], parameters=PARAMS), timeout=60))
        assert chunks
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(model=CANARY, inputs=[CANARY], parameters=PARAMS), timeout=60)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    m = scrape(metrics_port)
    model = tiny_model_dir.name
    gen = "/llamagrid.v1.Inference/Generate"
    assert value(m, "llamagrid_worker_requests_total", method=gen, code="OK") == 1
    assert value(m, "llamagrid_worker_requests_total", method=gen, code="NOT_FOUND") == 1
    assert value(m, "llamagrid_worker_requests_total", method="/llamagrid.v1.Inference/GenerateStream",
                 code="OK") == 1
    assert value(m, "llamagrid_worker_request_duration_seconds_count", method=gen) == 2
    assert value(m, "llamagrid_worker_jobs_finished_total", model=model) == 3
    assert value(m, "llamagrid_worker_prompt_tokens_total", model=model) > 0
    assert 3 <= value(m, "llamagrid_worker_generation_tokens_total", model=model) <= 12
    assert value(m, "llamagrid_worker_time_to_first_token_seconds_count", model=model) == 3
    assert value(m, "llamagrid_worker_e2e_request_latency_seconds_count", model=model) == 3
    assert value(m, "llamagrid_worker_time_per_output_token_seconds_count", model=model) >= 1
    total = value(m, "llamagrid_worker_kv_blocks_total", model=model)
    assert value(m, "llamagrid_worker_kv_blocks_free", model=model) + value(
        m, "llamagrid_worker_kv_blocks_used", model=model) == total > 0
    for name in ("llamagrid_worker_num_requests_waiting", "llamagrid_worker_num_requests_running",
                 "llamagrid_worker_preemptions", "llamagrid_worker_num_requests_in_flight"):
        assert name in m, name
    assert value(m, "llamagrid_worker_accepting", model=model) == 1
    assert CANARY not in all_label_values(m)


@pytest.fixture(scope="module")
def router(worker, tmp_path_factory):
    """(router address, metrics port, keys) in front of the metrics worker."""
    with RedisServer() as redis:
        keys = create_keys(redis.url, {"pro": ("pro", []), "tiny": ("tiny", [])})
        tiers = tmp_path_factory.mktemp("metrics-tiers") / "tiers.toml"
        tiers.write_text(TIERS)
        metrics_port = free_port()
        config = RouterConfig(port=0, metrics_port=metrics_port, workers=worker[0], redis_url=redis.url,
                              tiers_path=tiers, redis_timeout_s=0.5)
        with serve_router(config, num_workers=1) as handle:
            yield handle.address, metrics_port, keys


def test_router_metrics(router, tiny_model_dir):
    address, metrics_port, keys = router
    model = tiny_model_dir.name
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        request = pb.GenerateRequest(model=model, inputs=[CANARY], parameters=PARAMS)
        stub.Generate(request, metadata=auth(keys["pro"]), timeout=60)
        assert list(stub.GenerateStream(request, metadata=auth(keys["pro"]), timeout=60))
        codes = []
        for _ in range(3):  # the tiny tier's burst is 2 requests
            try:
                stub.Generate(request, metadata=auth(keys["tiny"]), timeout=60)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
        assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
        for key in (CANARY_KEY, None):  # an invalid key and a missing one
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(request, metadata=auth(key) if key else (), timeout=60)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(model=CANARY, inputs=[CANARY], parameters=PARAMS),
                          metadata=auth(keys["pro"]), timeout=60)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    m = scrape(metrics_port)
    gen = "/llamagrid.v1.Inference/Generate"
    assert value(m, "llamagrid_router_requests_total", method=gen, code="OK") == 1 + codes.count(grpc.StatusCode.OK)
    assert value(m, "llamagrid_router_requests_total", method=gen, code="RESOURCE_EXHAUSTED") >= 1
    assert value(m, "llamagrid_router_requests_total", method=gen, code="UNAUTHENTICATED") == 2
    assert value(m, "llamagrid_router_requests_total", method=gen, code="NOT_FOUND") == 1
    assert value(m, "llamagrid_router_requests_total", method="/llamagrid.v1.Inference/GenerateStream",
                 code="OK") == 1
    assert value(m, "llamagrid_router_request_duration_seconds_count", method=gen) == len(codes) + 4
    assert value(m, "llamagrid_router_ratelimit_decisions_total", outcome="allowed") >= 3
    assert value(m, "llamagrid_router_ratelimit_decisions_total", outcome="limited") >= 1
    assert value(m, "llamagrid_router_ratelimit_decisions_total", outcome="unavailable") == 0
    assert value(m, "llamagrid_router_auth_failures_total", reason="invalid") == 1
    assert value(m, "llamagrid_router_auth_failures_total", reason="missing") == 1
    assert value(m, "llamagrid_router_redis_errors_total", component="ratelimit") == 0
    assert value(m, "llamagrid_router_ratelimit_degraded") == 0
    assert value(m, "llamagrid_router_workers", model=model, healthy="true") == 1
    assert value(m, "llamagrid_router_workers_discovered") == 1
    finished = 2 + codes.count(grpc.StatusCode.OK)  # jobs that ran on the worker
    assert value(m, "llamagrid_router_time_to_first_token_seconds_count", model=model) == finished
    assert value(m, "llamagrid_router_prompt_tokens_total", model=model) > 0
    assert finished <= value(m, "llamagrid_router_completion_tokens_total", model=model) <= 4 * finished
    labels = all_label_values(m)
    assert CANARY not in labels
    assert not any(k in labels for k in keys.values())


def test_supervisor_counts_restarts_by_cause(tmp_path, tiny_model_dir):
    from tests.service.test_supervisor import Supervised

    metrics_port = free_port()
    sup = Supervised(tmp_path, tiny_model_dir, ["--metrics-port", str(metrics_port)])
    try:
        old_pgid = sup.wait_serving(1)
        m = scrape(metrics_port)
        assert value(m, "llamagrid_supervisor_group_starts_total") == 1
        assert value(m, "llamagrid_supervisor_group_serving") == 1
        os.kill(old_pgid, signal.SIGKILL)
        sup.wait_serving(2)
        m = scrape(metrics_port)
        assert value(m, "llamagrid_supervisor_group_starts_total") == 2
        assert value(m, "llamagrid_supervisor_group_failures_total", cause="killed") == 1
        assert value(m, "llamagrid_supervisor_restarts_total", cause="killed") == 1
        assert value(m, "llamagrid_supervisor_restarts_total", cause="crash") == 0
        assert value(m, "llamagrid_supervisor_group_serving") == 1
        assert value(m, "llamagrid_supervisor_crash_looped") == 0
    finally:
        sup.close()
