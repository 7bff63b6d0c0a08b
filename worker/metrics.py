"""Prometheus metrics of one worker replica, served over HTTP on `--metrics-port` (prometheus-client).

Every metric lives in the worker's own CollectorRegistry (never the process-global default). Label values are
bounded enums or the worker's own configured model name: never prompt or generated text, request ids, API keys
or any other caller-supplied string.

==============================================  =========  ====================  =======================================
name                                            type       labels                meaning
==============================================  =========  ====================  =======================================
llamagrid_worker_requests_total                 counter    method, code          finished gRPC calls by full method name
                                                                                 (/llamagrid.v1.Inference/Generate, ...)
                                                                                 and gRPC status code name (OK, ...)
llamagrid_worker_request_duration_seconds       histogram  method                gRPC call duration, by method
llamagrid_worker_jobs_finished_total            counter    model, finish_reason  engine jobs ended: EOS, LENGTH, STOP,
                                                                                 ... or ERROR
llamagrid_worker_time_to_first_token_seconds    histogram  model                 job submitted -> first generated token
llamagrid_worker_time_per_output_token_seconds  histogram  model                 mean gap between a job's later tokens
llamagrid_worker_e2e_request_latency_seconds    histogram  model                 job submitted -> finished
llamagrid_worker_prompt_tokens_total            counter    model                 prompt tokens of finished jobs
llamagrid_worker_cached_prompt_tokens_total     counter    model                 of those, served from the prefix cache
llamagrid_worker_generation_tokens_total        counter    model                 tokens generated (resumed ones
                                                                                 excluded)
llamagrid_worker_num_requests_waiting           gauge      model                 scheduler queue length (at scrape time)
llamagrid_worker_num_requests_running           gauge      model                 running sequences (at scrape time)
llamagrid_worker_num_requests_in_flight         gauge      model                 jobs the gRPC layer is streaming
llamagrid_worker_kv_blocks_used                 gauge      model                 KV-cache blocks in use
llamagrid_worker_kv_blocks_free                 gauge      model                 KV-cache blocks free
llamagrid_worker_kv_blocks_total                gauge      model                 KV-cache pool size in blocks
llamagrid_worker_preemptions_total              counter    model                 sequences preempted (recompute) since
                                                                                 start
llamagrid_worker_accepting                      gauge      model                 1 while serving, 0 warming up /
                                                                                 draining
==============================================  =========  ====================  =======================================
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Seconds. TTFT spans CPU tiny models (ms) to loaded GPUs with long prompts (tens of s).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)

RpcObserver = Callable[[str, grpc.StatusCode, float], None]


def serve_metrics(registry: CollectorRegistry, host: str, port: int):
    """Serve `registry` at http://host:port/metrics in a daemon thread; returns the HTTP server (its
    `server_port` is the bound port, 0 picks a free one). Stop it with `stop_metrics(server)`."""
    httpd, _ = start_http_server(port, addr=host, registry=registry)
    return httpd


def stop_metrics(httpd) -> None:
    with contextlib.suppress(Exception):
        httpd.shutdown()
        httpd.server_close()


class RpcMetrics:
    """requests_total{method, code} and request_duration_seconds{method} for one process (`prefix`: the
    metric-name prefix, e.g. llamagrid_worker)."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.requests = Counter(f"{prefix}_requests", "Finished gRPC calls by method and status code.",
                                ["method", "code"], registry=registry)
        self.duration = Histogram(f"{prefix}_request_duration_seconds", "gRPC call duration by method.",
                                  ["method"], buckets=E2E_BUCKETS, registry=registry)

    def observer(self, service: str) -> RpcObserver:
        """The `rpc_observer` for one servicer of `service` (full name), used by worker.errors' decorators."""

        def observe(method: str, code: grpc.StatusCode, seconds: float) -> None:
            full = f"/{service}/{method}"
            self.requests.labels(full, code.name).inc()
            self.duration.labels(full).observe(seconds)

        return observe


class WorkerMetrics:
    """The worker's registry. `service` (an InferenceService) and its engine are read at scrape time."""

    def __init__(self, model: str, service=None) -> None:
        self.model = model
        self.registry = CollectorRegistry(auto_describe=True)
        self.rpc = RpcMetrics(self.registry, "llamagrid_worker")
        r = self.registry
        self.jobs_finished = Counter("llamagrid_worker_jobs_finished", "Engine jobs ended, by finish reason.",
                                     ["model", "finish_reason"], registry=r)
        self.ttft = Histogram("llamagrid_worker_time_to_first_token_seconds", "Job submitted to first token.",
                              ["model"], buckets=TTFT_BUCKETS, registry=r).labels(model)
        self.tpot = Histogram("llamagrid_worker_time_per_output_token_seconds",
                              "Mean time between a job's generated tokens after the first.",
                              ["model"], buckets=TPOT_BUCKETS, registry=r).labels(model)
        self.e2e = Histogram("llamagrid_worker_e2e_request_latency_seconds", "Job submitted to finished.",
                             ["model"], buckets=E2E_BUCKETS, registry=r).labels(model)
        self.prompt_tokens = Counter("llamagrid_worker_prompt_tokens", "Prompt tokens of finished jobs.",
                                     ["model"], registry=r).labels(model)
        self.cached_tokens = Counter("llamagrid_worker_cached_prompt_tokens",
                                     "Prompt tokens of finished jobs served from the prefix cache.",
                                     ["model"], registry=r).labels(model)
        self.generation_tokens = Counter("llamagrid_worker_generation_tokens",
                                         "Tokens generated (tokens resumed from another worker excluded).",
                                         ["model"], registry=r).labels(model)
        if service is not None:
            r.register(_EngineCollector(model, service))

    def job_finished(self, event, started: float, first_token_at: float | None, num_resumed: int = 0) -> None:
        """One job's end (a worker.engine FinishEvent or ErrorEvent); times from time.monotonic()."""
        now = time.monotonic()
        reason = getattr(getattr(event, "finish_reason", None), "name", None) or "ERROR"
        self.jobs_finished.labels(self.model, reason).inc()
        self.e2e.observe(now - started)
        if first_token_at is not None:
            self.ttft.observe(first_token_at - started)
        if reason == "ERROR":
            return
        generated = max(event.num_output_tokens - num_resumed, 0)
        self.prompt_tokens.inc(event.num_prompt_tokens)
        self.cached_tokens.inc(event.num_cached_tokens)
        self.generation_tokens.inc(generated)
        if first_token_at is not None and generated > 1:
            self.tpot.observe((now - first_token_at) / (generated - 1))


class _EngineCollector:
    """Scheduler / KV-cache state read when scraped (the engine thread publishes a LoadSnapshot each step)."""

    def __init__(self, model: str, service) -> None:
        self.model = model
        self.service = service

    def describe(self):
        return []

    def collect(self):
        load = self.service.engine.load
        m = [self.model]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model"])
            g.add_metric(m, value)
            return g

        yield gauge("llamagrid_worker_num_requests_waiting", "Sequences waiting in the scheduler queue.",
                    load.num_waiting)
        yield gauge("llamagrid_worker_num_requests_running", "Running sequences.", load.num_running)
        yield gauge("llamagrid_worker_num_requests_in_flight", "Jobs the gRPC layer is streaming.",
                    self.service.num_in_flight)
        yield gauge("llamagrid_worker_kv_blocks_used", "KV-cache blocks in use.",
                    load.num_total_blocks - load.num_free_blocks)
        yield gauge("llamagrid_worker_kv_blocks_free", "KV-cache blocks free.", load.num_free_blocks)
        yield gauge("llamagrid_worker_kv_blocks_total", "KV-cache pool size in blocks.", load.num_total_blocks)
        yield gauge("llamagrid_worker_accepting", "1 while the worker accepts requests.",
                    1 if self.service.is_accepting else 0)
        c = CounterMetricFamily("llamagrid_worker_preemptions", "Sequences preempted since start.", labels=["model"])
        c.add_metric(m, self.service.engine.scheduler.num_preemptions)
        yield c
