"""The router's one configuration object, built from the command line plus secrets from the environment."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.event_loop import EVENT_LOOPS
from common.internal_auth import INTERNAL_TOKEN_ENV, read_internal_token
from ratelimit.policy import FailurePolicy
from router.discovery import from_spec

PEPPER_ENV = "LLAMAGRID_KEY_PEPPER"
REDIS_URL_ENV = "LLAMAGRID_REDIS_URL"
PROCESSES_ENV = "LLAMAGRID_ROUTER_PROCESSES"
ROUTINGS = ("cache", "load")


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """`workers` is a router.discovery spec: `host:port,host:port` (static) or `dns:NAME:PORT` (every A/AAAA record
    of NAME, re-resolved every `discovery_interval_s`)."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port
    metrics_port: int | None = None  # Prometheus /metrics on host:metrics_port; None = off, 0 = any free port
    metrics_host: str | None = None  # where /metrics listens; None = host
    # the OpenAI- and MosaicML-compatible HTTP API (router.http) on host:http_port; None = off, 0 = any free port
    http_port: int | None = None
    # N > 1: python -m router runs N router processes on one port (router.processes), each with its own config
    processes: int = 1
    reuse_port: bool = False  # SO_REUSEPORT on the client port: the processes of one --processes router share it
    workers: str = "127.0.0.1:50061"
    discovery_interval_s: float = 5.0
    redis_url: str | None = None  # None: build_router refuses; python -m router starts a private redis-server
    tiers_path: Path | None = None  # None = ratelimit.tiers.DEFAULT_TIERS
    tier_check_interval_s: float = 1.0
    failure_policy: FailurePolicy = FailurePolicy.FAIL_OPEN
    # a rate-limit call's deadline follows Redis' recent round trips (4x their p99) within these bounds: a busy but
    # healthy host does not trip it, a dead or stalled Redis does within redis_max_timeout_s
    redis_timeout_s: float = 0.25
    redis_max_timeout_s: float = 2.0
    fallback_cooldown_s: float = 1.0  # skip Redis this long after a failure
    fallback_share: float | None = None  # of a tier, for this router's local buckets; None = 1 / routers alive
    router_heartbeat_s: float = 2.0  # how often this router renews its entry in the registry of live routers
    key_pepper: bytes = field(default=b"", repr=False)  # secret: never in repr or logs
    max_auth_failures: int = 10  # per peer per minute, then UNAUTHENTICATED without a lookup
    auth_stale_s: float = 300.0  # fail-open: keys verified this recently keep working while Redis is down (0 = off)
    default_model: str | None = None  # None = the request must name a model
    retry_attempts: int = 3  # failovers per request: worker failures before or during its stream (then resumed)
    failover_wait_s: float = 30.0  # a failed-over request waits this long (or its deadline) for a healthy worker
    drain_grace_s: float = 30.0  # on SIGTERM: in-flight calls get this long to finish
    # "cache": each request goes where its prompt's leading blocks are cached, weighed against load
    # (router.prefix_routing); "load": power of two choices on load only
    routing: str = "cache"
    # the one knob of cache-aware routing: this many cached prompt tokens outweigh one more request outstanding
    # on a worker (smaller: affinity counts for more; larger: load does). 128 by bench/prefix_routing.py on CPU
    cache_affinity_tokens: int = 128
    dispatch_ahead: bool = True  # start a verified key's job while its admission is in flight (router.ahead)
    max_request_chars: int = 200_000  # characters of text in one call (all inputs, or a turn's messages) at most
    chat_max_age_s: float = 3600.0  # a Chat session ends (UNAVAILABLE) once this old, after its current turn
    chat_idle_timeout_s: float = 600.0  # a Chat session with no turn for this long ends (UNAVAILABLE)
    tls_cert: Path | None = None  # PEM chain for the client port; with tls_key, or neither (plaintext)
    tls_key: Path | None = None
    internal_token: str | None = field(default=None, repr=False)  # secret sent to workers (common.internal_auth)
    # client connections (common.connections.server_options; 0 turns an idle, age or stream limit off)
    keepalive_time_s: float = 60.0  # ping a quiet connection: dead clients' calls end (under most LBs' idle cutoffs)
    keepalive_timeout_s: float = 20.0  # ... and drop it when the ping is not answered in this time
    min_client_ping_interval_s: float = 10.0  # clients' own keepalive pings, with or without calls, this often at most
    max_connection_idle_s: float = 300.0  # GOAWAY to a connection without calls this long
    max_connection_age_s: float = 1800.0  # GOAWAY to older connections: clients spread over new router replicas
    max_connection_age_grace_s: float = 3600.0  # ... whose calls may finish meanwhile (a Chat session included)
    max_concurrent_streams: int = 1024  # calls in flight on one connection; more wait in the client
    log_level: str = "info"
    event_loop: str = "auto"  # uvloop when installed (common.event_loop), or "uvloop" / "asyncio"
    accept_ahead: int = 32  # new calls per public method gRPC core may match at once (router.accept); 0 = grpc's 1

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in 0..65535, got {self.port!r}")
        for name in ("metrics_port", "http_port"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= 65535):
                raise ValueError(f"{name} must be None or an integer in 0..65535, got {value!r}")
        if not self.host:
            raise ValueError("host must not be empty")
        if self.metrics_host is not None and not self.metrics_host:
            raise ValueError("metrics_host must be None or a non-empty host")
        if self.accept_ahead < 0:
            raise ValueError(f"accept_ahead must be at least 0, got {self.accept_ahead}")
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError(f"event_loop must be one of {', '.join(EVENT_LOOPS)}, got {self.event_loop!r}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        if isinstance(self.cache_affinity_tokens, bool) or not isinstance(self.cache_affinity_tokens, int) \
                or self.cache_affinity_tokens < 1:
            raise ValueError(f"cache_affinity_tokens must be an integer >= 1, got {self.cache_affinity_tokens!r}")
        if isinstance(self.processes, bool) or not isinstance(self.processes, int) or self.processes < 1:
            raise ValueError(f"processes must be an integer >= 1, got {self.processes!r}")
        if not isinstance(self.workers, str):
            raise ValueError(f"workers must be a discovery spec string, got {self.workers!r}")
        from_spec(self.workers)  # raises ValueError naming the bad target; builds no connection
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, got {self.redis_url!r}")
        if not isinstance(self.failure_policy, FailurePolicy):
            raise ValueError(f"failure_policy must be a FailurePolicy, got {self.failure_policy!r}")
        for name in ("redis_timeout_s", "redis_max_timeout_s", "tier_check_interval_s", "discovery_interval_s",
                     "failover_wait_s", "router_heartbeat_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.fallback_share is not None and not 0 < self.fallback_share <= 1:
            raise ValueError(f"fallback_share must be in (0, 1], got {self.fallback_share!r}")
        if self.fallback_cooldown_s < 0:
            raise ValueError(f"fallback_cooldown_s must be >= 0, got {self.fallback_cooldown_s!r}")
        if self.auth_stale_s < 0:
            raise ValueError(f"auth_stale_s must be >= 0, got {self.auth_stale_s!r}")
        if self.max_auth_failures < 1:
            raise ValueError(f"max_auth_failures must be >= 1, got {self.max_auth_failures!r}")
        if self.retry_attempts < 0:
            raise ValueError(f"retry_attempts must be >= 0, got {self.retry_attempts!r}")
        for name in ("max_request_chars", "chat_max_age_s", "chat_idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.drain_grace_s < 0:
            raise ValueError(f"drain_grace_s must be >= 0, got {self.drain_grace_s!r}")
        for name in ("keepalive_time_s", "keepalive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("min_client_ping_interval_s", "max_connection_idle_s", "max_connection_age_s",
                     "max_connection_age_grace_s", "max_concurrent_streams"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: no such file {path}")
        if self.default_model is not None and not self.default_model.strip():
            raise ValueError("default_model must be None or a non-empty name")


def build_parser() -> argparse.ArgumentParser:
    d = RouterConfig.__dataclass_fields__
    p = argparse.ArgumentParser(prog="python -m router", description="Public gRPC entry: auth, rate limits, routing.")
    p.add_argument("--host", default=d["host"].default)
    p.add_argument("--port", type=int, default=d["port"].default, help="0 picks a free port")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics here (0: a free port)")
    p.add_argument("--metrics-host", default=None, help="the address /metrics listens on (default: --host)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI- and MosaicML-compatible HTTP API here, on --host (0: a free port; "
                        "default: off)")
    p.add_argument("--processes", type=int, default=None,
                   help=f"router processes sharing the port (SO_REUSEPORT), e.g. one per core; their /metrics are "
                        f"merged on --metrics-port with a `process` label (default ${PROCESSES_ENV}, else 1)")
    p.add_argument("--reuse-port", action="store_true",
                   help="set SO_REUSEPORT on the client port, so other processes may serve it too (--processes "
                        "sets it in its own processes)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", default=None, help=f"host:port,host:port (default {d['workers'].default})")
    where.add_argument("--workers-dns", default=None, metavar="NAME:PORT",
                       help="every address of NAME (e.g. a headless Service), re-resolved periodically")
    p.add_argument("--discovery-interval", type=float, default=d["discovery_interval_s"].default, help="seconds")
    p.add_argument("--redis-url", default=None,
                   help=f"default ${REDIS_URL_ENV}; neither = python -m router starts a private redis-server")
    p.add_argument("--tiers", type=Path, default=None, help="tier TOML file, re-read when it changes")
    p.add_argument("--tier-check-interval", type=float, default=d["tier_check_interval_s"].default)
    p.add_argument("--failure-policy", choices=[f.value for f in FailurePolicy],
                   default=d["failure_policy"].default.value, help="when Redis is down")
    p.add_argument("--redis-timeout", type=float, default=d["redis_timeout_s"].default,
                   help="seconds a rate-limit call may take at least (it adapts to Redis' recent latency)")
    p.add_argument("--redis-max-timeout", type=float, default=d["redis_max_timeout_s"].default,
                   help="seconds a rate-limit call may take at most")
    p.add_argument("--fallback-cooldown", type=float, default=d["fallback_cooldown_s"].default, help="seconds")
    p.add_argument("--fallback-share", type=float, default=None,
                   help="fraction of a tier this router admits alone while Redis is down (default 1 / routers alive)")
    p.add_argument("--router-heartbeat", type=float, default=d["router_heartbeat_s"].default,
                   help="seconds between this router's heartbeats in the registry of live routers")
    p.add_argument("--max-auth-failures", type=int, default=d["max_auth_failures"].default)
    p.add_argument("--auth-stale", type=float, default=d["auth_stale_s"].default,
                   help="fail-open: seconds a verified key keeps working while Redis is down (0 = off)")
    p.add_argument("--default-model", default=None)
    p.add_argument("--retry-attempts", type=int, default=d["retry_attempts"].default,
                   help="failovers per request (before or after its first token)")
    p.add_argument("--failover-wait", type=float, default=d["failover_wait_s"].default,
                   help="seconds a failed-over request waits for a healthy worker (bounded by its deadline)")
    p.add_argument("--drain-grace", type=float, default=d["drain_grace_s"].default,
                   help="seconds in-flight calls get to finish after SIGTERM")
    p.add_argument("--routing", choices=ROUTINGS, default=d["routing"].default,
                   help="cache: send a request where its prompt's prefix is cached, weighed against load (the "
                        "workers publish their caches); load: the less loaded of two random workers")
    p.add_argument("--cache-affinity-tokens", type=int, default=d["cache_affinity_tokens"].default,
                   help="cached prompt tokens worth one more request outstanding on a worker (--routing cache)")
    p.add_argument("--no-dispatch-ahead", dest="dispatch_ahead", action="store_false",
                   help="send a job to a worker only after its admission (default: a key verified here before, with "
                        "rate-limit room left, is dispatched while the admission round trip is in flight)")
    p.add_argument("--max-request-chars", type=int, default=d["max_request_chars"].default,
                   help="characters of text one call may carry in all (inputs, a turn's messages, CountTokens)")
    p.add_argument("--chat-max-age", type=float, default=d["chat_max_age_s"].default,
                   help="seconds a Chat session may stay open (it ends after the turn in progress)")
    p.add_argument("--chat-idle-timeout", type=float, default=d["chat_idle_timeout_s"].default,
                   help="seconds a Chat session may wait for its next turn")
    _add_connection_args(p, d)
    p.add_argument("--log-level", default=d["log_level"].default)
    p.add_argument("--event-loop", choices=EVENT_LOOPS, default=d["event_loop"].default,
                   help="the event loop: uvloop when installed (auto, the default; its passes cost less, and grpc.aio "
                        "takes one new call per pass), or asyncio's own")
    p.add_argument("--accept-ahead", type=int, default=d["accept_ahead"].default,
                   help="new calls of each public method that gRPC may hand over in one event-loop pass (grpc.aio "
                        "alone: 1, so a burst of calls waits passes; 0 keeps grpc.aio's own)")
    return p


def _add_connection_args(p: argparse.ArgumentParser, d: dict) -> None:
    """TLS, the internal token, and how client connections are kept alive and recycled."""
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain for the client port")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key for --tls-cert")
    p.add_argument("--internal-token-file", type=Path, default=None,
                   help=f"token sent to workers (default ${INTERNAL_TOKEN_ENV}; neither = none)")
    p.add_argument("--keepalive-time", type=float, default=d["keepalive_time_s"].default,
                   help="seconds a client connection may be quiet before the router pings it")
    p.add_argument("--keepalive-timeout", type=float, default=d["keepalive_timeout_s"].default,
                   help="seconds to wait for a ping's answer before closing the connection")
    p.add_argument("--min-client-ping-interval", type=float, default=d["min_client_ping_interval_s"].default,
                   help="seconds between a client's keepalive pings at least (faster ones get GOAWAY)")
    p.add_argument("--max-connection-idle", type=float, default=d["max_connection_idle_s"].default,
                   help="seconds a connection without calls is kept (0: forever)")
    p.add_argument("--max-connection-age", type=float, default=d["max_connection_age_s"].default,
                   help="seconds before a connection is asked to reconnect (0: never)")
    p.add_argument("--max-connection-age-grace", type=float, default=d["max_connection_age_grace_s"].default,
                   help="seconds the calls of such a connection get to finish")
    p.add_argument("--max-concurrent-streams", type=int, default=d["max_concurrent_streams"].default,
                   help="calls in flight per connection (0: no cap)")


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> RouterConfig:
    """The config from parsed args; the key pepper (and defaults of the redis URL and the processes) come from
    `environ` (os.environ)."""
    env = os.environ if environ is None else environ
    return RouterConfig(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        http_port=args.http_port,
        processes=_processes(args, env),
        reuse_port=args.reuse_port,
        workers=_workers_spec(args),
        discovery_interval_s=args.discovery_interval,
        redis_url=args.redis_url or env.get(REDIS_URL_ENV) or None,
        tiers_path=args.tiers,
        tier_check_interval_s=args.tier_check_interval,
        failure_policy=FailurePolicy(args.failure_policy),
        redis_timeout_s=args.redis_timeout,
        redis_max_timeout_s=args.redis_max_timeout,
        fallback_cooldown_s=args.fallback_cooldown,
        fallback_share=args.fallback_share,
        router_heartbeat_s=args.router_heartbeat,
        key_pepper=env.get(PEPPER_ENV, "").encode(),
        max_auth_failures=args.max_auth_failures,
        auth_stale_s=args.auth_stale,
        default_model=args.default_model,
        retry_attempts=args.retry_attempts,
        failover_wait_s=args.failover_wait,
        drain_grace_s=args.drain_grace,
        routing=args.routing,
        cache_affinity_tokens=args.cache_affinity_tokens,
        dispatch_ahead=args.dispatch_ahead,
        max_request_chars=args.max_request_chars,
        chat_max_age_s=args.chat_max_age,
        chat_idle_timeout_s=args.chat_idle_timeout,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        internal_token=read_internal_token(args.internal_token_file, env),
        keepalive_time_s=args.keepalive_time,
        keepalive_timeout_s=args.keepalive_timeout,
        min_client_ping_interval_s=args.min_client_ping_interval,
        max_connection_idle_s=args.max_connection_idle,
        max_connection_age_s=args.max_connection_age,
        max_connection_age_grace_s=args.max_connection_age_grace,
        max_concurrent_streams=args.max_concurrent_streams,
        log_level=args.log_level,
        event_loop=args.event_loop,
        accept_ahead=args.accept_ahead,
    )


def _processes(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    if args.processes is not None:
        return args.processes
    text = env.get(PROCESSES_ENV, "").strip()
    if not text:
        return 1
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{PROCESSES_ENV} must be an integer >= 1, got {text!r}") from None


def _workers_spec(args: argparse.Namespace) -> str:
    if args.workers_dns:
        return f"dns:{args.workers_dns}"
    return args.workers or RouterConfig.__dataclass_fields__["workers"].default
