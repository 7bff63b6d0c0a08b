"""Prometheus pieces every process uses: histogram buckets, per-RPC counters, the /metrics HTTP server."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

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
        """The `rpc_observer` for one servicer of `service` (full name), used by common.errors' decorators."""

        children: dict[tuple[str, grpc.StatusCode], tuple] = {}  # labels() is a lock and a key build per call

        def observe(method: str, code: grpc.StatusCode, seconds: float) -> None:
            pair = children.get((method, code))
            if pair is None:
                full = f"/{service}/{method}"
                pair = children[(method, code)] = (self.requests.labels(full, code.name), self.duration.labels(full))
            pair[0].inc()
            pair[1].observe(seconds)

        return observe
