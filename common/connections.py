"""HTTP/2 connection settings of a grpc.aio server: keepalive, idle and age limits, streams per connection."""

from __future__ import annotations

INT_MAX = 2**31 - 1  # what grpc takes as "never" for the settings below


def _ms(seconds: float) -> int:
    return min(int(round(seconds * 1000)), INT_MAX)


def server_options(*, keepalive_time_s: float, keepalive_timeout_s: float, min_client_ping_interval_s: float,
                   max_connection_idle_s: float = 0.0, max_connection_age_s: float = 0.0,
                   max_connection_age_grace_s: float = 0.0, max_concurrent_streams: int = 0,
                   ) -> list[tuple[str, int]]:
    """grpc.aio.server options. The server pings each connection after `keepalive_time_s` without activity and
    drops it when no answer comes within `keepalive_timeout_s`, also while its streams are quiet (a dead client's
    calls are cancelled instead of holding their work). Clients may ping too, with or without calls, every
    `min_client_ping_interval_s` at most. A connection without calls for `max_connection_idle_s`, or older than
    `max_connection_age_s` (grpc adds +-10% jitter), gets a GOAWAY: its client reconnects (to any replica behind a
    load balancer) and its calls get `max_connection_age_grace_s` to finish. 0 turns the idle, age and stream limits
    off."""
    options = [
        ("grpc.keepalive_time_ms", _ms(keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(keepalive_timeout_s)),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging while a stream waits (a Chat between turns)
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(min_client_ping_interval_s)),
    ]
    if max_connection_idle_s > 0:
        options.append(("grpc.max_connection_idle_ms", _ms(max_connection_idle_s)))
    if max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", _ms(max_connection_age_s)))
        options.append(("grpc.max_connection_age_grace_ms", _ms(max_connection_age_grace_s)))
    if max_concurrent_streams > 0:
        options.append(("grpc.max_concurrent_streams", max_concurrent_streams))
    return options
