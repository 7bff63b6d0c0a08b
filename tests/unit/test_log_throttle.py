"""Repeated warnings: the first at once, then at most one line per interval carrying the suppressed count."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import structlog

from common.internal_auth import InternalTokenInterceptor
from common.log_throttle import Throttle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict]] = []

    def warning(self, event: str, **fields) -> None:
        self.lines.append((event, fields))


def test_first_at_once_then_one_per_interval_with_the_count():
    clock, log = Clock(), Recorder()
    throttle = Throttle(10.0, clock=clock)
    assert throttle.warn(log, "refused", peer="a")
    for _ in range(5):
        clock.now += 1.0
        assert not throttle.warn(log, "refused", peer="b")
    clock.now += 4.999
    assert not throttle.warn(log, "refused", peer="c")  # 9.999 s after the last line
    clock.now += 0.001
    assert throttle.warn(log, "refused", peer="d")
    clock.now += 10.0
    assert throttle.warn(log, "refused", peer="e")  # nothing suppressed in between
    assert log.lines == [("refused", {"suppressed": 0, "peer": "a"}), ("refused", {"suppressed": 6, "peer": "d"}),
                         ("refused", {"suppressed": 0, "peer": "e"})]


def test_a_pending_count_comes_with_the_next_occurrence_however_late():
    clock, log = Clock(), Recorder()
    throttle = Throttle(10.0, clock=clock)
    throttle.warn(log, "refused")
    throttle.warn(log, "refused")
    throttle.warn(log, "refused")
    clock.now += 3600.0
    throttle.warn(log, "refused")
    assert [f["suppressed"] for _, f in log.lines] == [0, 2]


def test_keys_are_independent():
    clock, log = Clock(), Recorder()
    throttle = Throttle(10.0, clock=clock)
    for _ in range(3):
        throttle.warn(log, "auth_failed", key="missing")
        throttle.warn(log, "auth_failed", key="invalid")
        throttle.warn(log, "auth_blocked")
    assert [e for e, _ in log.lines] == ["auth_failed", "auth_failed", "auth_blocked"]
    clock.now += 10.0
    throttle.warn(log, "auth_failed", key="invalid")
    assert log.lines[-1] == ("auth_failed", {"suppressed": 2})


def test_log_takes_any_level_method():
    clock = Clock()
    throttle = Throttle(1.0, clock=clock)
    lines = []
    assert throttle.log(lambda event, **f: lines.append((event, f)), "x", a=1)
    assert not throttle.log(lambda event, **f: lines.append((event, f)), "x", a=2)
    assert lines == [("x", {"suppressed": 0, "a": 1})]


def test_remembered_keys_are_bounded():
    clock, log = Clock(), Recorder()
    throttle = Throttle(10.0, clock=clock, max_keys=2)
    for key in ("a", "b", "c"):
        throttle.warn(log, "e", key=key)
    assert len(throttle._keys) == 2
    throttle.warn(log, "e", key="a")  # forgotten: logged again at once
    assert len(log.lines) == 4


def test_zero_interval_logs_everything():
    log = Recorder()
    throttle = Throttle(0.0, clock=Clock())
    for _ in range(3):
        throttle.warn(log, "e")
    assert [f["suppressed"] for _, f in log.lines] == [0, 0, 0]


@pytest.mark.parametrize("kwargs", [{"interval_s": -1.0}, {"interval_s": 1.0, "max_keys": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Throttle(**kwargs)


def test_refused_internal_token_calls_log_one_line_per_interval():
    async def info(request, context):
        return b"ok"

    async def main():
        server = grpc.aio.server(interceptors=[InternalTokenInterceptor("t" * 16, log_interval_s=3600.0)])
        handler = grpc.unary_unary_rpc_method_handler(info)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", {"Info": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = ch.unary_unary("/t.S/Info")
                codes = []
                for _ in range(20):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call(b"", timeout=10)
                    codes.append(err.value.code())
                return codes
        finally:
            await server.stop(None)

    with structlog.testing.capture_logs() as logs:
        codes = asyncio.run(main())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 20
    refused = [e for e in logs if e["event"] == "internal_token_refused"]
    assert refused == [{"event": "internal_token_refused", "log_level": "warning", "suppressed": 0,
                        "method": "/t.S/Info", "present": False}]
