"""Connection settings of the router's public port, seen from a client: keepalive pings, GOAWAY to an idle
connection (the channel goes IDLE and reconnects for the next call), and the streams-per-connection cap that the
server advertises in its HTTP/2 SETTINGS."""

from __future__ import annotations

import queue
import socket
import struct
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.connections import INT_MAX, server_options
from router.config import RouterConfig, build_parser, config_from_args
from tests.support.router import router_in_thread

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, PING, GOAWAY = 0x4, 0x6, 0x7
ACK = 0x1
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3


@pytest.fixture(scope="module")
def router(redis_server):
    config = RouterConfig(port=0, workers="127.0.0.1:9", redis_url=redis_server.url, keepalive_time_s=0.2,
                          keepalive_timeout_s=10.0, max_connection_idle_s=0.5, max_concurrent_streams=3)
    with router_in_thread(config) as address:
        yield address


def _frame(kind: int, flags: int = 0, payload: bytes = b"", stream: int = 0) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


class RawConnection:
    """A bare HTTP/2 connection: the client preface, then frames read one by one (no call is ever made)."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.sendall(PREFACE + _frame(SETTINGS))
        self._buf = b""

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def next_frame(self) -> tuple[int, int, bytes]:
        header = self._read(9)
        length = int.from_bytes(header[:3], "big")
        return header[3], header[4], self._read(length)

    def wait_for(self, kind: int, timeout_s: float = 10.0) -> tuple[int, bytes]:
        """Frames until one of `kind` (not an ACK): its flags and payload. Answers the server's SETTINGS and PINGs
        on the way, as any client does."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            frame_kind, flags, payload = self.next_frame()
            if frame_kind == kind and not (kind in (SETTINGS, PING) and flags & ACK):
                return flags, payload
            if frame_kind == SETTINGS and not flags & ACK:
                self.sock.sendall(_frame(SETTINGS, ACK))
            elif frame_kind == PING and not flags & ACK:
                self.sock.sendall(_frame(PING, ACK, payload))
        raise AssertionError(f"no frame of type {kind} within {timeout_s} s")

    def close(self) -> None:
        self.sock.close()


def test_server_advertises_the_stream_cap(router):
    conn = RawConnection(router)
    try:
        _, payload = conn.wait_for(SETTINGS)
        settings = dict(struct.unpack(">HI", payload[i:i + 6]) for i in range(0, len(payload), 6))
        assert settings[SETTINGS_MAX_CONCURRENT_STREAMS] == 3
    finally:
        conn.close()


def test_quiet_connection_is_pinged_then_idle_one_gets_goaway(router):
    conn = RawConnection(router)
    try:
        conn.wait_for(PING)  # keepalive_time 0.2 s
        conn.wait_for(GOAWAY)  # max_connection_idle 0.5 s: no call ever came
    finally:
        conn.close()


def test_idle_channel_is_closed_by_the_server_and_reconnects(router):
    states: queue.Queue = queue.Queue()
    with grpc.insecure_channel(router) as ch:
        ch.subscribe(states.put, try_to_connect=False)
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        seen, deadline = [], time.monotonic() + 10
        while not (grpc.ChannelConnectivity.READY in seen and seen[-1] == grpc.ChannelConnectivity.IDLE):
            seen.append(states.get(timeout=max(0.01, deadline - time.monotonic())))
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING  # the next call opens a new connection


def test_server_options_map_seconds_and_zero_means_off():
    on = dict(server_options(keepalive_time_s=60, keepalive_timeout_s=20, min_client_ping_interval_s=10,
                             max_connection_idle_s=300, max_connection_age_s=1800, max_connection_age_grace_s=1e9,
                             max_concurrent_streams=1024))
    assert on == {"grpc.keepalive_time_ms": 60_000, "grpc.keepalive_timeout_ms": 20_000,
                  "grpc.http2.max_pings_without_data": 0, "grpc.keepalive_permit_without_calls": 1,
                  "grpc.http2.min_ping_interval_without_data_ms": 10_000, "grpc.max_connection_idle_ms": 300_000,
                  "grpc.max_connection_age_ms": 1_800_000, "grpc.max_connection_age_grace_ms": INT_MAX,
                  "grpc.max_concurrent_streams": 1024}
    off = dict(server_options(keepalive_time_s=60, keepalive_timeout_s=20, min_client_ping_interval_s=10))
    assert not {"grpc.max_connection_idle_ms", "grpc.max_connection_age_ms", "grpc.max_concurrent_streams"} & set(off)


def test_router_flags():
    args = build_parser().parse_args(["--keepalive-time", "30", "--keepalive-timeout", "5",
                                      "--min-client-ping-interval", "1", "--max-connection-idle", "0",
                                      "--max-connection-age", "600", "--max-connection-age-grace", "60",
                                      "--max-concurrent-streams", "64"])
    config = config_from_args(args, environ={})
    assert (config.keepalive_time_s, config.keepalive_timeout_s, config.min_client_ping_interval_s,
            config.max_connection_idle_s, config.max_connection_age_s, config.max_connection_age_grace_s,
            config.max_concurrent_streams) == (30, 5, 1, 0, 600, 60, 64)
    for bad in ({"keepalive_time_s": 0}, {"keepalive_timeout_s": -1}, {"max_connection_idle_s": -1},
                {"max_concurrent_streams": -1}):
        with pytest.raises(ValueError):
            RouterConfig(**bad)
