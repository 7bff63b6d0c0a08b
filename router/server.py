"""Wiring: build the router's parts from its config, serve them on a gRPC server, and stop them in order."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import structlog
from grpc_reflection.v1alpha import reflection

from common.connections import server_options
from common.internal_auth import token_metadata
from common.rpc_guard import RequestGuard
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from ratelimit.limiter import RateLimiter, connect
from ratelimit.peers import PeerRegistry
from ratelimit.policy import FailurePolicy, GuardedLimiter
from ratelimit.tiers import TierSource
from router.accept import ExtraAcceptors, method_handlers
from router.admission import Admission
from router.auth import Authenticator, LastKnownKeys
from router.background import Background
from router.concurrency import KeySlots
from router.config import RouterConfig
from router.discovery import from_spec
from router.health import HEALTH_SERVICE, INFERENCE_SERVICE, RouterHealth
from router.keys import ApiKeyStore
from router.metrics import RouterMetrics, serve_metrics, stop_metrics
from router.relay import Relay
from router.servicer import RouterServicer
from router.worker_pool import WorkerPool

log = structlog.get_logger("router.server")


def _bind(server: grpc.aio.Server, config: RouterConfig) -> int:
    address = f"{config.host}:{config.port}"
    if config.tls_cert is not None:
        credentials = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    return port


def _grpc_server(config: RouterConfig, interceptors: list[grpc.aio.ServerInterceptor]) -> grpc.aio.Server:
    connections = server_options(
        keepalive_time_s=config.keepalive_time_s, keepalive_timeout_s=config.keepalive_timeout_s,
        min_client_ping_interval_s=config.min_client_ping_interval_s,
        max_connection_idle_s=config.max_connection_idle_s, max_connection_age_s=config.max_connection_age_s,
        max_connection_age_grace_s=config.max_connection_age_grace_s,
        max_concurrent_streams=config.max_concurrent_streams)
    # SO_REUSEPORT only when asked (the processes of `--processes N`): else a second router on a port in use fails
    reuse_port = 1 if config.reuse_port else 0
    return grpc.aio.server(options=[("grpc.so_reuseport", reuse_port), *connections], interceptors=interceptors)


@dataclass(frozen=True)
class Served:
    """A started router: its gRPC server and port, its HTTP port (None without config.http_port), and an async
    `cleanup(grace_s=config.drain_grace_s)` that drains (health NOT_SERVING, no new calls or requests, those in
    flight get up to grace_s to finish) and stops everything it started."""

    server: grpc.aio.Server
    port: int
    http_port: int | None
    cleanup: Callable[..., Awaitable[None]]


async def build_router(config: RouterConfig, pool: WorkerPool | None = None) -> Served:
    """Build and start the router against the Redis at config.redis_url. `pool` (default: one from config.workers)
    is started here and stopped by cleanup; pass one to watch its health."""
    if config.redis_url is None:
        raise ValueError("the router needs config.redis_url (python -m router starts an embedded Redis without one)")
    ceiling_s = max(config.redis_timeout_s, config.redis_max_timeout_s)
    client = connect(config.redis_url, timeout_s=ceiling_s, connect_timeout_s=config.redis_timeout_s)
    peers = PeerRegistry(client, heartbeat_s=config.router_heartbeat_s, timeout_s=ceiling_s)
    await peers.start()
    limiter = GuardedLimiter(RateLimiter(client, timeout_s=config.redis_timeout_s, max_timeout_s=ceiling_s),
                             policy=config.failure_policy, cooldown_s=config.fallback_cooldown_s,
                             num_routers=peers.count, fallback_share=config.fallback_share)
    if pool is None:
        pool = WorkerPool(from_spec(config.workers, config.discovery_interval_s))
    pool.metadata = token_metadata(config.internal_token)
    pool.cache_routing = config.routing == "cache"
    pool.affinity_tokens = config.cache_affinity_tokens
    await pool.start()
    last_known = (LastKnownKeys(config.auth_stale_s)
                  if config.failure_policy is FailurePolicy.FAIL_OPEN and config.auth_stale_s > 0 else None)
    auth = Authenticator(ApiKeyStore(client, pepper=config.key_pepper), config.max_auth_failures,
                         last_known=last_known)
    background = Background()
    metrics = RouterMetrics(pool, auth, limiter, background)
    pool.on_decision = metrics.routing_decision
    admission = Admission(config, auth, limiter, TierSource(config.tiers_path, config.tier_check_interval_s), pool,
                          metrics, KeySlots(num_routers=peers.count), background)
    relay = Relay(config, pool, metrics, background)
    metrics_http = None
    if config.metrics_port is not None:
        metrics_http = serve_metrics(metrics.registry, config.metrics_host or config.host, config.metrics_port)
        log.info("metrics_serving", port=metrics_http.server_port)
    interceptors = [RequestGuard()]  # (also run by the extra acceptors: router.accept)
    server = _grpc_server(config, interceptors)
    servicer = RouterServicer(config, admission, relay, metrics)
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    health = RouterHealth(pool)
    health.add_to_server(server)
    reflection.enable_server_reflection((INFERENCE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    port = _bind(server, config)
    http = None
    if config.http_port is not None:
        from router.http.app import Edge
        from router.http.server import HttpServer

        http = HttpServer(Edge(servicer, metrics, health.ready), config.host, config.http_port, config.reuse_port,
                          config.drain_grace_s, config.tls_cert, config.tls_key)
    await server.start()
    accepting = ExtraAcceptors(server, method_handlers(pb_grpc.add_InferenceServicer_to_server, servicer),
                               interceptors, config.accept_ahead).start()
    if http is not None:
        await http.start()
    await health.start()
    metrics.loop_lag.start()
    log.info("router_started", port=port, http_port=http.port if http is not None else None, workers=config.workers,
             accept_ahead=config.accept_ahead if accepting else 0,
             routers=peers.count(), tls=config.tls_cert is not None,
             internal_token=config.internal_token is not None)

    async def cleanup(grace_s: float | None = None) -> None:
        grace = config.drain_grace_s if grace_s is None else grace_s
        metrics.loop_lag.stop()
        await health.drain()
        log.info("router_draining", grace_s=grace)
        if http is not None:
            http.server.config.timeout_graceful_shutdown = grace
            await asyncio.gather(server.stop(grace), http.stop())
        else:
            await server.stop(grace)
        await background.wait()
        await limiter.close()
        await peers.stop()
        await health.stop()
        await pool.stop()
        await client.aclose()
        if metrics_http is not None:
            stop_metrics(metrics_http)
        log.info("router_stopped")

    return Served(server, port, http.port if http is not None else None, cleanup)
