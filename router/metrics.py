"""Prometheus metrics of one router, served over HTTP on `--metrics-port` (prometheus-client).

Every metric lives in the router's own CollectorRegistry (never the process-global default), so several routers
in one process do not clash. Label values are bounded enums, gRPC method/status names, or model names reported by
the workers themselves (their own configuration): never request text, API keys, key ids, peers or any other
caller-supplied string.

============================================  =========  ==============  ===============================================
name                                          type       labels          meaning
============================================  =========  ==============  ===============================================
llamagrid_router_requests_total               counter    method, code    finished public gRPC calls by full method name
                                                                         (/llamagrid.v1.Inference/Generate, ...) and
                                                                         gRPC status code name (OK, RESOURCE_EXHAUSTED,
                                                                         ...)
llamagrid_router_request_duration_seconds     histogram  method          end-to-end call duration as the router sees it
llamagrid_router_http_requests_total          counter    route, status   finished HTTP requests (--http-port) by route
                                                                         template (POST /v1/chat/completions, POST
                                                                         /{model}/v1/predict, ...) and HTTP status
llamagrid_router_http_request_duration_seconds histogram route           end-to-end HTTP request duration
llamagrid_router_time_to_first_token_seconds  histogram  model           job sent to a worker -> first token (failovers
                                                                         included)
llamagrid_router_prompt_tokens_total          counter    model           prompt tokens of finished jobs (worker-reported
                                                                         usage)
llamagrid_router_completion_tokens_total      counter    model           completion tokens of finished jobs
llamagrid_router_ratelimit_decisions_total    counter    outcome         admission decisions: allowed (Redis),
                                                                         allowed_local (local buckets, Redis down,
                                                                         fail-open), limited (RESOURCE_EXHAUSTED),
                                                                         concurrency_limited (the key's calls in
                                                                         flight or Chat sessions at its cap),
                                                                         unavailable (fail-closed)
llamagrid_router_dispatch_ahead_total         counter    outcome         requests sent to a worker while their admission
                                                                         was in flight (router.ahead): kept (admitted)
                                                                         or cancelled (denied, or the key failed)
llamagrid_router_ratelimit_fallbacks_total    counter    -               answers (charges and refunds) given by the
                                                                         local buckets while Redis was failing
llamagrid_router_ratelimit_recoveries_total   counter    -               Redis came back after failing
llamagrid_router_ratelimit_replayed_total     counter    -               local-bucket charges (per key and bucket)
                                                                         written back to Redis after it recovered
llamagrid_router_routers_alive                gauge      -               routers in the Redis registry, this one
                                                                         included: each takes 1/N of a tier's caps
                                                                         and of its fallback buckets
llamagrid_router_ratelimit_degraded           gauge      -               1 while the limiter is skipping a failed Redis
llamagrid_router_auth_failures_total          counter    reason          failed authentications: missing (no key),
                                                                         invalid (unknown or revoked key), blocked (too
                                                                         many failures from the peer)
llamagrid_router_auth_stale_hits_total        counter    -               keys accepted from the last-known cache while
                                                                         the key store was down (fail-open)
llamagrid_router_redis_errors_total           counter    component       Redis failures: ratelimit (limiter calls) or
                                                                         keystore (API-key lookups)
llamagrid_router_workers                      gauge      model, healthy  discovered workers by model (empty before a
                                                                         worker answered Info) and health
                                                                         ("true"/"false")
llamagrid_router_workers_discovered           gauge      -               discovered workers (the pool size)
llamagrid_router_worker_cached_blocks         gauge      worker          blocks in a worker's prefix cache as its
                                                                         CacheEvents stream tells (absent while unknown)
llamagrid_router_routing_decisions_total      counter    reason          worker choices: cache, spill, load, no_view,
                                                                         sticky (router.balancer)
llamagrid_router_routing_decision_seconds     histogram  -               time to choose a worker, the prompt's
                                                                         tokenizing and hashing included
llamagrid_router_predicted_cached_tokens_total counter   model           prompt tokens expected cached on the worker
                                                                         chosen (cache routing)
llamagrid_router_cached_prompt_tokens_total   counter    model           prompt tokens workers served from their prefix
                                                                         cache (Usage.cached_prompt_tokens)
llamagrid_router_event_loop_lag_seconds       histogram  -               how late the router's event loop ran a timer
                                                                         due every 50 ms: the wait of every new call
                                                                         and relayed message at that moment
llamagrid_router_processes                    gauge      -               --processes N only, from the parent: router
                                                                         processes serving
llamagrid_router_process_restarts_total       counter    process         --processes N only, from the parent: processes
                                                                         started again after exiting, by index
============================================  =========  ==============  ===============================================

With `--processes N` (router.processes) each process serves this registry on a loopback port of its own, and the
parent's --metrics-port re-exposes every process's samples with one more label, `process` ("0" .. "N-1": the
index, not a pid, so bounded and kept by a restarted process): `sum without (process)` gives the router's totals
and each counter stays monotonic per process. Gauges of shared state (routers_alive, workers) are each process's
own view: aggregate them with max, not sum.
"""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from common.loop_lag import LoopLag
from common.metrics import TTFT_BUCKETS, RpcMetrics, serve_metrics, stop_metrics  # noqa: F401 - re-exported
from router.balancer import REASONS

INFERENCE_SERVICE = "llamagrid.v1.Inference"
DECISION_OUTCOMES = ("allowed", "allowed_local", "limited", "concurrency_limited", "unavailable")
AHEAD_OUTCOMES = ("kept", "cancelled")
AUTH_FAILURE_REASONS = ("missing", "invalid", "blocked")
ROUTING_REASONS = REASONS
ROUTING_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05)


class RouterMetrics:
    """The router's registry. `pool`, `auth` and `limiter` (any of them may be None) are read at scrape time."""

    def __init__(self, pool=None, auth=None, limiter=None, background=None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rpc = RpcMetrics(self.registry, "llamagrid_router")
        self.rpc_observer = self.rpc.observer(INFERENCE_SERVICE)
        decisions = Counter("llamagrid_router_ratelimit_decisions", "Rate-limit admission decisions by outcome.",
                            ["outcome"], registry=self.registry)
        self._decisions = {o: decisions.labels(o) for o in DECISION_OUTCOMES}  # every outcome exported from 0
        ahead = Counter("llamagrid_router_dispatch_ahead", "Jobs sent to a worker while their admission was in "
                        "flight, by outcome.", ["outcome"], registry=self.registry)
        self._ahead = {o: ahead.labels(o) for o in AHEAD_OUTCOMES}
        self.ttft = Histogram("llamagrid_router_time_to_first_token_seconds",
                              "Worker job sent to its first token, failovers included.", ["model"],
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("llamagrid_router_prompt_tokens", "Prompt tokens of finished jobs.", ["model"],
                                     registry=self.registry)
        self.completion_tokens = Counter("llamagrid_router_completion_tokens",
                                         "Completion tokens of finished jobs.", ["model"], registry=self.registry)
        self.cached_prompt_tokens = Counter("llamagrid_router_cached_prompt_tokens", "Prompt tokens of finished jobs "
                                            "their worker served from its prefix cache.", ["model"],
                                            registry=self.registry)
        self.predicted_cached_tokens = Counter("llamagrid_router_predicted_cached_tokens", "Prompt tokens the "
                                               "router expected cached on the worker it chose (cache routing).",
                                               ["model"], registry=self.registry)
        routing = Counter("llamagrid_router_routing_decisions", "Worker choices by reason (router.balancer).",
                          ["reason"], registry=self.registry)
        self._routing = {r: routing.labels(r) for r in ROUTING_REASONS}
        self.routing_seconds = Histogram("llamagrid_router_routing_decision_seconds", "Time to choose a worker for "
                                         "a job, its prompt's tokenizing and hashing included.",
                                         buckets=ROUTING_BUCKETS, registry=self.registry)
        self.http_requests = Counter("llamagrid_router_http_requests", "Finished HTTP requests by route template "
                                     "and HTTP status.", ["route", "status"], registry=self.registry)
        self.http_seconds = Histogram("llamagrid_router_http_request_duration_seconds", "End-to-end HTTP request "
                                      "duration by route template.", ["route"], registry=self.registry)
        self.registry.register(_StateCollector(pool, auth, limiter, background))
        self.loop_lag = LoopLag(self.registry, "llamagrid_router")
        self._by_model: dict[str, tuple] = {}  # model -> (ttft, prompt, completion, cached, predicted) children

    def _model(self, model: str) -> tuple:
        children = self._by_model.get(model)
        if children is None:  # (labels() takes a lock and builds its key on every call: looked up once per model)
            children = self._by_model[model] = (self.ttft.labels(model), self.prompt_tokens.labels(model),
                                                self.completion_tokens.labels(model),
                                                self.cached_prompt_tokens.labels(model),
                                                self.predicted_cached_tokens.labels(model))
        return children

    def ratelimit_decision(self, outcome: str) -> None:
        self._decisions[outcome].inc()

    def dispatch_ahead(self, outcome: str) -> None:
        self._ahead[outcome].inc()

    # `model` below: a name already checked against the pool's healthy models (RouterServicer._resolve_model)

    def first_token(self, model: str, seconds: float) -> None:
        self._model(model)[0].observe(seconds)

    def usage(self, model: str, usage) -> None:
        """One finished job's llamagrid.v1.Usage, as its worker reported it."""
        _, prompt, completion, cached, _ = self._model(model)
        prompt.inc(usage.prompt_tokens)
        completion.inc(usage.completion_tokens)
        cached.inc(usage.cached_prompt_tokens)

    def routing_decision(self, reason: str, predicted_cached_tokens: int, model: str) -> None:
        self._routing[reason].inc()
        if predicted_cached_tokens:
            self._model(model)[4].inc(predicted_cached_tokens)

    def http_request(self, route: str, status: int, seconds: float) -> None:
        """One finished HTTP request; `route` is the app's route template (bounded), never the path as sent."""
        self.http_requests.labels(route, str(status)).inc()
        self.http_seconds.labels(route).observe(seconds)

    def routing_time(self, seconds: float) -> None:
        self.routing_seconds.observe(seconds)


def _from_scrape_thread(read) -> list:
    """read() of the pool from the scrape thread: the pool's loop may change its workers meanwhile; retry then."""
    for _ in range(3):
        try:
            return read()
        except (RuntimeError, KeyError):
            continue
    return []


class _StateCollector:
    """Counters the router's components already keep (LimiterCounters, Authenticator) and the pool's view."""

    def __init__(self, pool, auth, limiter, background=None) -> None:
        self.pool = pool
        self.auth = auth
        self.limiter = limiter
        self.background = background

    def describe(self):
        return []

    def collect(self):
        redis_errors = CounterMetricFamily("llamagrid_router_redis_errors", "Redis failures by component.",
                                           labels=["component"])
        limiter_errors = keystore_errors = 0
        if self.limiter is not None:
            c = self.limiter.counters
            limiter_errors = c.backend_errors
            yield CounterMetricFamily("llamagrid_router_ratelimit_fallbacks",
                                      "Limiter answers given by the local buckets while Redis failed.",
                                      value=c.fallbacks)
            yield CounterMetricFamily("llamagrid_router_ratelimit_recoveries", "Redis recovered after failing.",
                                      value=c.recoveries)
            yield GaugeMetricFamily("llamagrid_router_ratelimit_degraded", "1 while a failed Redis is skipped.",
                                    value=1 if self.limiter.degraded else 0)
            yield CounterMetricFamily("llamagrid_router_ratelimit_replayed",
                                      "Local-bucket charges written back to Redis after it recovered.",
                                      value=c.replayed)
            yield GaugeMetricFamily("llamagrid_router_routers_alive", "Routers alive in the Redis registry.",
                                    value=self.limiter.num_routers())
        if self.background is not None:
            yield GaugeMetricFamily("llamagrid_router_background_tasks", "Settlements, refunds and finished worker "
                                    "calls still running off the calls' path.", value=self.background.pending)
        if self.auth is not None:
            keystore_errors = getattr(self.auth, "backend_errors", 0)
            failures = CounterMetricFamily("llamagrid_router_auth_failures", "Failed authentications by reason.",
                                           labels=["reason"])
            counts = getattr(self.auth, "failure_counts", {})
            for reason in AUTH_FAILURE_REASONS:
                failures.add_metric([reason], counts.get(reason, 0))
            yield failures
            yield CounterMetricFamily("llamagrid_router_auth_stale_hits",
                                      "Keys accepted from the last-known cache while the key store was down.",
                                      value=self.auth.stale_hits)
        redis_errors.add_metric(["ratelimit"], limiter_errors)
        redis_errors.add_metric(["keystore"], keystore_errors)
        yield redis_errors
        if self.pool is not None:
            states = _from_scrape_thread(self.pool.snapshot)
            tally = Tally((s.model or "", "true" if s.is_healthy else "false") for s in states)
            workers = GaugeMetricFamily("llamagrid_router_workers", "Discovered workers by model and health.",
                                        labels=["model", "healthy"])
            for (model, healthy), n in sorted(tally.items()):
                workers.add_metric([model, healthy], n)
            yield workers
            yield GaugeMetricFamily("llamagrid_router_workers_discovered", "Discovered workers.", value=len(states))
            blocks = GaugeMetricFamily("llamagrid_router_worker_cached_blocks", "Blocks in each worker's prefix "
                                       "cache as its CacheEvents stream tells (absent while unknown).",
                                       labels=["worker"])
            for address, count in _from_scrape_thread(self.pool.cached_blocks):
                blocks.add_metric([address], count)
            yield blocks
