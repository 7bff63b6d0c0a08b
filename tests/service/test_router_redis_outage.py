"""The limiter when Redis dies under load and comes back: fail-open serves from local buckets (never more than a
key's bucket held when Redis went away) and writes its charges back; fail-closed refuses fast; both use Redis again
by themselves. A real persistent redis-server is killed and restarted; a real router in a thread; fake workers."""

from __future__ import annotations

import time

import grpc
import pytest

from common.ports import free_port
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from ratelimit.policy import FailurePolicy
from ratelimit.redis_server import RedisServer
from router.config import RouterConfig
from tests.support.load import SteadyLoad, bucket_field, code_of, redis_ms
from tests.support.metrics import scrape, value
from tests.support.router import Key, auth, config_for, new_keys, serve_router
from tests.support.waits import wait_until

NO_REFILL = 0.001  # units per minute: nothing refills within a test
TIERS = f"""
[tiers.pro]
requests_per_minute = 60000
tokens_per_minute = 100000000

[tiers.steady]  # plenty, without refill: its request bucket is a hash that stays in Redis
requests_per_minute = {NO_REFILL}
request_burst = 1000000
tokens_per_minute = 100000000

[tiers.limited]  # 3 requests, then nothing
requests_per_minute = {NO_REFILL}
request_burst = 3
tokens_per_minute = 100000000
"""
SHORT = pb.SamplingParameters(max_new_tokens=1, temperature=0.0)


@pytest.fixture(scope="module")
def outage_redis():
    """A persistent redis-server (append-only file, fsync always) that the tests kill and restart."""
    server = RedisServer(persistent=True)
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def workers(module_fakes):
    return module_fakes.start_many(2)


@pytest.fixture(scope="module")
def tiers_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("outage-tiers") / "tiers.toml"
    path.write_text(TIERS)
    return path


def _config(redis_url: str, workers, tiers_path, policy: FailurePolicy, metrics_port: int) -> RouterConfig:
    return config_for(workers, redis_url, tiers_path, failure_policy=policy, redis_timeout_s=0.05,
                      fallback_cooldown_s=0.2, metrics_port=metrics_port)


def _metric(port: int, name: str) -> float:
    return value(scrape(port), name)


def test_fail_open_serves_through_a_redis_outage_then_uses_redis_again(outage_redis, workers, tiers_path):
    keys = new_keys(outage_redis.url, {"pro": "steady", "lim_a": "limited", "lim_b": "limited"})
    metrics_port = free_port()
    config = _config(outage_redis.url, workers, tiers_path, FailurePolicy.FAIL_OPEN, metrics_port)
    request = pb.GenerateRequest(inputs=["x"], parameters=SHORT)
    with serve_router(config, num_workers=2) as router, grpc.insecure_channel(router.address) as ch:
        stub = pb_grpc.InferenceStub(ch)

        def call(key: Key) -> grpc.StatusCode:
            return code_of(lambda: stub.Generate(request, metadata=auth(key.plaintext), timeout=10))

        # with Redis up: lim_b spends its 3 requests, lim_a one of them (both become known to the router)
        assert [call(keys["lim_b"]) for _ in range(4)] == [grpc.StatusCode.OK] * 3 + [
            grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert call(keys["lim_a"]) == grpc.StatusCode.OK
        with SteadyLoad(router.address, keys["pro"].plaintext) as load:
            load.wait_calls(3, 0.0, "the steady load to run before the outage")
            outage_redis.kill()
            killed_at = time.monotonic()
            try:
                wait_until(lambda: _metric(metrics_port, "llamagrid_router_ratelimit_fallbacks_total") > 0,
                           "the router to answer from its local buckets")
                # fail-open: the local bucket took over where lim_a's Redis bucket stood (2 left; this router is
                # the only one, so its share is the whole tier), not from full
                codes = [call(keys["lim_a"]) for _ in range(4)]
                load.wait_calls(3, killed_at, "the steady load to make progress during the outage")
            finally:
                restarted_before = time.monotonic()
                outage_redis.start()
            restart_ms = redis_ms(outage_redis.url)
            assert codes == [grpc.StatusCode.OK] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
            # the router goes back to Redis by itself: the steady load's request bucket is written again
            wait_until(lambda: (bucket_field(outage_redis.url, keys["pro"].key_id, "req", "ts") or 0) >= restart_ms,
                       "the router to write to Redis again after it restarted", 15)
            # ... and writes lim_a's 2 local admissions back (its bucket held 2 before the outage)
            wait_until(lambda: bucket_field(outage_redis.url, keys["lim_a"].key_id, "req", "tokens") < 0.5,
                       "lim_a's local charges to be written back to Redis", 15)
        # lim_b was exhausted in Redis before the outage and not used since: only Redis' state can refuse it;
        # lim_a's local admissions were written back to Redis when it came back
        assert call(keys["lim_b"]) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert call(keys["lim_a"]) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert call(keys["pro"]) == grpc.StatusCode.OK
        assert _metric(metrics_port, "llamagrid_router_ratelimit_replayed_total") >= 1
    assert load.results and all(code == grpc.StatusCode.OK for _, _, code in load.results), \
        {str(c) for _, _, c in load.results}
    during = load.between(killed_at, restarted_before)
    assert len(during) >= 3, "the steady load made no progress during the outage"


def test_fail_closed_refuses_fast_during_a_redis_outage_and_recovers(outage_redis, workers, tiers_path):
    keys = new_keys(outage_redis.url, {"pro": "pro"})
    config = _config(outage_redis.url, workers, tiers_path, FailurePolicy.FAIL_CLOSED, free_port())
    request = pb.GenerateRequest(inputs=["x"], parameters=SHORT)
    with serve_router(config, num_workers=2) as router, grpc.insecure_channel(router.address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        stub.Generate(request, metadata=auth(keys["pro"].plaintext), timeout=10)
        with SteadyLoad(router.address, keys["pro"].plaintext) as load:
            load.wait_calls(3, 0.0, "the steady load to run before the outage")
            outage_redis.kill()
            killed_at = time.monotonic()
            try:
                wait_until(lambda: [r for r in load.between(killed_at, time.monotonic())
                                    if r[2] == grpc.StatusCode.UNAVAILABLE],
                           "the steady load to be refused for the outage")
                probes = []
                for _ in range(5):
                    t0 = time.monotonic()
                    code = code_of(lambda: stub.Generate(request, metadata=auth(keys["pro"].plaintext), timeout=10))
                    probes.append((code, time.monotonic() - t0))
                # calls that started well after the kill (none still in flight from before it)
                wait_until(lambda: load.between(killed_at + 0.3, time.monotonic()),
                           "a steady call started 0.3 s or more into the outage")
            finally:
                restarted_before = time.monotonic()
                outage_redis.start()
            wait_until(lambda: code_of(lambda: stub.Generate(request, metadata=auth(keys["pro"].plaintext),
                                                             timeout=10)) == grpc.StatusCode.OK,
                       "requests to succeed again after Redis restarted", 15)
            recovered_at = time.monotonic()
            load.wait_calls(1, recovered_at, "a steady call after the recovery")
        for code, took in probes:
            assert code == grpc.StatusCode.UNAVAILABLE
            assert took < 1.0, f"a refusal took {took:.3f} s"
        during = load.between(killed_at + 0.3, restarted_before)
        assert during, "the steady load made no progress during the outage"
        assert all(code == grpc.StatusCode.UNAVAILABLE and end - start < 1.0 for start, end, code in during)
        after = [r for r in load.results if r[0] >= recovered_at]
        assert after and all(code == grpc.StatusCode.OK for _, _, code in after)
        assert [code_of(lambda: stub.Generate(request, metadata=auth(keys["pro"].plaintext), timeout=10))
                for _ in range(3)] == [grpc.StatusCode.OK] * 3
