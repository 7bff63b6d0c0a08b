"""Prometheus metrics of one worker replica, served over HTTP on `--metrics-port` (prometheus-client).

Every metric lives in the worker's own CollectorRegistry (never the process-global default). Label values are
bounded enums or the worker's own configured model name: never prompt or generated text, request ids, API keys
or any other caller-supplied string.

==============================================  =========  ====================  =======================================
name                                            type       labels                meaning
==============================================  =========  ====================  =======================================
llamagrid_worker_requests_total                 counter    method, code          finished gRPC calls by full method name
                                                                                 (/llamagrid.worker.v1.Worker/Run, ...)
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
llamagrid_worker_cache_event_subscribers        gauge      model                 open CacheEvents streams (one per
                                                                                 router following this cache)
==============================================  =========  ====================  =======================================
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from common.metrics import E2E_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS, RpcMetrics, serve_metrics, stop_metrics  # noqa: F401


class WorkerMetrics:
    """The worker's registry. `service` (a worker.service.WorkerService) and its engine are read at scrape time."""

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
        yield gauge("llamagrid_worker_cache_event_subscribers", "Open CacheEvents streams.",
                    self.service.engine.cache_events.num_subscribers)
        c = CounterMetricFamily("llamagrid_worker_preemptions", "Sequences preempted since start.", labels=["model"])
        c.add_metric(m, self.service.engine.scheduler.num_preemptions)
        yield c
