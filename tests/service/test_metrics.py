"""Prometheus /metrics of a real worker, of an in-process router (in front of a fake worker) and of a supervisor,
scraped over HTTP. No request text or API key appears anywhere in them."""

from __future__ import annotations

import grpc
import pytest

from common.ports import free_port
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from router.config import RouterConfig
from tests.support import metrics
from tests.support.metrics import all_label_values, value
from tests.support.router import auth, create_keys, serve_router
from tests.support.waits import wait_until

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
RUN = "/llamagrid.worker.v1.Worker/Run"
GENERATE = "/llamagrid.worker.v1.Worker/Generate"


def scrape(port: int) -> dict[str, list]:
    """Metric family name -> its samples, after checking that no request text or key is anywhere in the page."""
    body = metrics.scrape_text(port)
    assert CANARY not in body and CANARY_KEY not in body  # no request text or key anywhere, label values included
    return metrics.scrape(port)


def _worker_idle(stub: wpb_grpc.WorkerStub) -> bool:
    load = stub.Load(wpb.LoadRequest(), timeout=5)
    return load.num_running == load.num_waiting == 0


def test_worker_metrics(real_workers, tiny_model_dir):
    """One of the session's real workers (shared: every count is read as its change over this test)."""
    worker = real_workers[0]
    model = tiny_model_dir.name
    with grpc.insecure_channel(worker.address) as ch:
        stub = wpb_grpc.WorkerStub(ch)
        wait_until(lambda: _worker_idle(stub), "the shared worker to be idle")
        before = scrape(worker.metrics_port)
        assert value(before, "llamagrid_worker_kv_blocks_total") > 0
        for i, text in enumerate((CANARY, CANARY + " again")):
            assert list(stub.Run(wpb.Job(request_id=f"metrics-{i}", text=text, parameters=PARAMS), timeout=60))
        job = wpb.Job(request_id="metrics-2", text=CANARY, parameters=PARAMS)
        assert list(stub.Generate(iter([wpb.WorkerRequest(job=job)]), timeout=60))
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Run(wpb.Job(request_id="metrics-3", model=CANARY, text=CANARY, parameters=PARAMS),
                          timeout=60))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        # (a job's counts are recorded as it ends, just after its last event went out)
        wait_until(lambda: value(scrape(worker.metrics_port), "llamagrid_worker_jobs_finished_total", model=model)
                   - value(before, "llamagrid_worker_jobs_finished_total", model=model) >= 3,
                   "the worker to count the three jobs")
        m = scrape(worker.metrics_port)

    def delta(name: str, **labels: str) -> float:
        return value(m, name, **labels) - value(before, name, **labels)

    assert delta("llamagrid_worker_requests_total", method=RUN, code="OK") == 2
    assert delta("llamagrid_worker_requests_total", method=RUN, code="NOT_FOUND") == 1
    assert delta("llamagrid_worker_requests_total", method=GENERATE, code="OK") == 1
    assert delta("llamagrid_worker_request_duration_seconds_count", method=RUN) == 3
    assert delta("llamagrid_worker_jobs_finished_total", model=model) == 3
    assert delta("llamagrid_worker_prompt_tokens_total", model=model) > 0
    assert 3 <= delta("llamagrid_worker_generation_tokens_total", model=model) <= 12
    assert delta("llamagrid_worker_time_to_first_token_seconds_count", model=model) == 3
    assert delta("llamagrid_worker_e2e_request_latency_seconds_count", model=model) == 3
    assert delta("llamagrid_worker_time_per_output_token_seconds_count", model=model) >= 1
    total = value(m, "llamagrid_worker_kv_blocks_total", model=model)
    assert value(m, "llamagrid_worker_kv_blocks_free", model=model) + value(
        m, "llamagrid_worker_kv_blocks_used", model=model) == total > 0
    for name in ("llamagrid_worker_num_requests_waiting", "llamagrid_worker_num_requests_running",
                 "llamagrid_worker_preemptions", "llamagrid_worker_num_requests_in_flight"):
        assert name in m, name
    assert value(m, "llamagrid_worker_accepting", model=model) == 1
    assert CANARY not in all_label_values(m)


@pytest.fixture(scope="module")
def router(redis_server, module_fakes, tmp_path_factory):
    """(router address, metrics port, keys, model) in front of a fake worker."""
    worker = module_fakes.start()
    keys = create_keys(redis_server.url, {"pro": ("pro", []), "tiny": ("tiny", [])})
    tiers = tmp_path_factory.mktemp("metrics-tiers") / "tiers.toml"
    tiers.write_text(TIERS)
    metrics_port = free_port()
    config = RouterConfig(port=0, metrics_port=metrics_port, workers=worker.address, redis_url=redis_server.url,
                          tiers_path=tiers, redis_timeout_s=0.5)
    with serve_router(config, num_workers=1) as handle:
        yield handle.address, metrics_port, keys, worker.script.model


def test_router_metrics(router):
    address, metrics_port, keys, model = router
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
    # the event loop's lag is sampled every 50 ms from the start: samples, each under a second on an idle router
    m = wait_until(lambda: (lambda m: m if value(m, "llamagrid_router_event_loop_lag_seconds_count") >= 2 else None)(
        scrape(metrics_port)), "two event-loop lag samples")
    assert value(m, "llamagrid_router_event_loop_lag_seconds_bucket", le="1.0") >= 1
    labels = all_label_values(m)
    assert CANARY not in labels
    assert not any(k in labels for k in keys.values())
