"""Admission under load: two routers sharing one Redis admit exactly a key's burst, every call is metered, and a
known key's admission is one Redis round trip (settlement one more). Real routers, a real redis-server, real gRPC;
fake workers (the tokens they report are known exactly, so every settlement can be checked to the token)."""

from __future__ import annotations

import re

import grpc
import pytest

from common.ports import free_port
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from router.config import RouterConfig
from router.costs import estimate_text
from tests.support import metrics
from tests.support.load import bucket_field, code_of, generate_many, levels
from tests.support.router import admin, auth, config_for, new_keys, serve_router
from tests.support.waits import wait_until

NO_REFILL = 0.001  # units per minute: nothing refills within a test
TIERS = f"""
[tiers.pro]
requests_per_minute = 60000
tokens_per_minute = 100000000

[tiers.burst]  # 20 requests, then nothing
requests_per_minute = {NO_REFILL}
request_burst = 20
tokens_per_minute = 100000000

[tiers.tokens]  # 21 tokens, then nothing
requests_per_minute = {NO_REFILL}
request_burst = 1000
tokens_per_minute = {NO_REFILL}
token_burst = 21

[tiers.limited]  # 3 requests, then nothing
requests_per_minute = {NO_REFILL}
request_burst = 3
tokens_per_minute = 100000000

[tiers.meter]  # large buckets that do not refill: every charge shows exactly
requests_per_minute = {NO_REFILL}
request_burst = 1000
tokens_per_minute = {NO_REFILL}
token_burst = 1000000
"""
SHORT = pb.SamplingParameters(max_new_tokens=1, temperature=0.0)
SMALL = pb.SamplingParameters(max_new_tokens=4, temperature=0.0)
LONG = pb.SamplingParameters(max_new_tokens=2000, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def workers(module_fakes):
    return module_fakes.start_many(2)


@pytest.fixture(scope="module")
def tiers_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("admission-tiers") / "tiers.toml"
    path.write_text(TIERS)
    return path


def router_config(redis_url: str, workers, tiers_path, **overrides) -> RouterConfig:
    return config_for(workers, redis_url, tiers_path, **overrides)


@pytest.fixture(scope="module")
def main_router(redis_server, workers, tiers_path):
    # heartbeats into the router registry are rare here, so the Redis round trips of a call can be counted alone
    metrics_port = free_port()
    with serve_router(router_config(redis_server.url, workers, tiers_path, router_heartbeat_s=600.0,
                                    metrics_port=metrics_port), num_workers=2) as router:
        router.metrics_port = metrics_port
        yield router


@pytest.fixture(scope="module")
def stub(main_router):
    with grpc.insecure_channel(main_router.address) as ch:
        yield pb_grpc.InferenceStub(ch)


# ---- two routers, one Redis


def test_two_routers_admit_exactly_the_request_burst(redis_server, workers, tiers_path):
    key = new_keys(redis_server.url, {"burst": "burst"})["burst"]
    config = router_config(redis_server.url, workers, tiers_path)
    with serve_router(config, num_workers=2) as r1, serve_router(config, num_workers=2) as r2:
        request = pb.GenerateRequest(inputs=["x"], parameters=SHORT)
        outcomes = generate_many([r1.address, r2.address], key.plaintext, request, 60)
        admitted = [o for o in outcomes if o.code == grpc.StatusCode.OK]
        denied = [o for o in outcomes if o.code != grpc.StatusCode.OK]
        assert len(admitted) == 20, [(o.code, o.details) for o in denied if
                                     o.code != grpc.StatusCode.RESOURCE_EXHAUSTED]
        # every admission debited the one shared bucket once, atomically: the remaining counts are 19..0
        remaining = sorted(int(o.initial["x-ratelimit-remaining-requests"]) for o in admitted)
        assert remaining == list(range(20))
        for o in denied:
            assert o.code == grpc.StatusCode.RESOURCE_EXHAUSTED, o.details
            assert int(o.trailing["retry-after-ms"]) > 0
        assert {o.router for o in denied} == {0, 1}
        # no refill: one more call on either router is still refused
        again = generate_many([r2.address, r1.address], key.plaintext, request, 2)
        assert [o.code for o in again] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2


def test_two_routers_admit_exactly_the_token_burst(redis_server, workers, tiers_path):
    key = new_keys(redis_server.url, {"tokens": "tokens"})["tokens"]
    config = router_config(redis_server.url, workers, tiers_path)
    # "the" is BOS + one token, plus the one generated: a request uses exactly what it reserves, so settlement
    # neither refunds (which could admit an 8th) nor charges excess (an early finisher's debit could starve a
    # later admission): the count depends on the admissions alone, whatever the timing
    request = pb.GenerateRequest(inputs=["the"], parameters=SHORT)
    cost = estimate_text("the", SHORT, 0)
    assert cost == 3  # 21 tokens fit 7 such requests exactly
    with serve_router(config, num_workers=2) as r1, serve_router(config, num_workers=2) as r2:
        outcomes = generate_many([r1.address, r2.address], key.plaintext, request, 40)
    admitted = [o for o in outcomes if o.code == grpc.StatusCode.OK]
    assert len(admitted) == 7
    for o in admitted:
        usage = o.response.outputs[0].usage
        assert usage.prompt_tokens + usage.completion_tokens == cost
    assert sorted(int(o.initial["x-ratelimit-remaining-tokens"]) for o in admitted) == list(range(0, 21, 3))
    for o in outcomes:
        if o.code != grpc.StatusCode.OK:
            assert o.code == grpc.StatusCode.RESOURCE_EXHAUSTED, o.details
            assert int(o.trailing["retry-after-ms"]) > 0
    # the request bucket was not debited by the 33 refusals: both or neither
    level = bucket_field(redis_server.url, key.key_id, "req", "tokens")
    assert 993 <= level < 993.01


# ---- every call is metered


def test_count_tokens_and_list_models_are_metered(stub, redis_server):
    """Each costs one request; CountTokens also the tokens it counted (reserved as an estimate, settled exactly)."""
    key = new_keys(redis_server.url, {"meter": "meter"})["meter"]
    md = auth(key.plaintext)
    first, call = stub.Generate.with_call(pb.GenerateRequest(inputs=["hello there"], parameters=SMALL),
                                          metadata=md, timeout=30)
    assert int(dict(call.initial_metadata())["x-ratelimit-remaining-requests"]) == 999
    counted = 0
    for i in range(5):
        response, call = stub.CountTokens.with_call(pb.CountTokensRequest(text="hello there"), metadata=md,
                                                    timeout=10)
        assert response.count > 0 and int(dict(call.initial_metadata())["x-ratelimit-remaining-requests"]) \
            == 998 - 2 * i
        counted += response.count
        models, call = stub.ListModels.with_call(pb.ListModelsRequest(), metadata=md, timeout=10)
        assert models.models and int(dict(call.initial_metadata())["x-ratelimit-remaining-requests"]) == 997 - 2 * i
    used = first.outputs[0].usage.prompt_tokens + first.outputs[0].usage.completion_tokens
    wait_until(lambda: abs(bucket_field(redis_server.url, key.key_id, "tok", "tokens")
                           - (1_000_000 - used - counted)) <= 0.01,
               "settlements to bring the token bucket to the exact usage")
    assert bucket_field(redis_server.url, key.key_id, "req", "tokens") == pytest.approx(1000 - 11, abs=0.01)


# ---- admission takes one Redis round trip (and settlement one)


@pytest.fixture()
def redis_sends(monkeypatch):
    """Every request the router's asyncio Redis clients send, as the list of command names in it (a pipeline is
    one send: one round trip)."""
    from redis.asyncio.connection import AbstractConnection

    sends: list[list[str]] = []
    original = AbstractConnection.send_packed_command

    async def counting(self, command, check_health=True):
        chunks = [command] if isinstance(command, (bytes, str, memoryview)) else command
        data = b"".join(bytes(c) if not isinstance(c, str) else c.encode() for c in chunks)
        sends.append([m.decode() for m in re.findall(rb"\*\d+\r\n\$\d+\r\n([A-Z]+)\r\n", data)])
        return await original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    return sends


def _used(response: pb.GenerateResponse) -> int:
    return sum(o.usage.prompt_tokens + o.usage.completion_tokens for o in response.outputs)


def test_admission_is_one_redis_round_trip_and_settlement_one(stub, redis_server, redis_sends):
    key = new_keys(redis_server.url, {"meter": "meter"})["meter"]
    request = pb.GenerateRequest(inputs=["one round trip"], parameters=SMALL)
    used = _used(stub.Generate(request, metadata=auth(key.plaintext), timeout=30))  # this router's first sight
    assert used < estimate_text("one round trip", SMALL, 0)  # so its settlement is a refund
    wait_until(lambda: levels(redis_server.url, key.key_id) == pytest.approx([999, 1_000_000 - used], abs=0.01),
               "the first call's settlement")
    assert [s for s in redis_sends if "EVALSHA" in s or "HGETALL" in s], redis_sends
    for _ in range(3):
        req_before, tok_before = levels(redis_server.url, key.key_id)
        redis_sends.clear()
        stream = stub.GenerateStream(pb.GenerateRequest(inputs=["one round trip"], parameters=LONG),
                                     metadata=auth(key.plaintext), timeout=30)
        stream.initial_metadata()
        stream.cancel()  # refunded whole: a cancelled stream reports no usage
        response = stub.Generate(request, metadata=auth(key.plaintext), timeout=30)
        assert response.outputs[0].usage.completion_tokens > 0
        # both settled: the stream's reservation given back, the call charged exactly what it used
        want = [req_before - 2, tok_before - _used(response)]
        wait_until(lambda want=want: levels(redis_server.url, key.key_id) == pytest.approx(want, abs=0.01),
                   "both calls' settlements")
        handshake = ("HELLO", "CLIENT", "AUTH", "SELECT")  # a new pooled connection's set-up, once per connection
        sends = [s for s in redis_sends if s and s[0] not in handshake]
        admissions = [s for s in sends if "HGETALL" in s]
        refunds = [s for s in sends if "HGETALL" not in s]
        # two calls: each admitted by one send holding the key lookup and the charge; each settled by at most one
        # charge (a refund; none when the call used all it reserved) — the cancelled stream's refund at least
        assert admissions == [["HGETALL", "EVALSHA"]] * 2, sends
        assert refunds in ([["EVALSHA"]], [["EVALSHA"]] * 2), sends


def test_a_wrong_one_round_trip_guess_is_refunded(stub, main_router, redis_server):
    """The one-round-trip admission charges the tier the key had; when the lookup in the same round trip shows the
    key revoked, restricted to other models or moved to another tier, that charge is given back exactly."""
    request = pb.GenerateRequest(inputs=["guess"], parameters=SMALL)

    # a key that may use another model only: PERMISSION_DENIED both times, its buckets untouched (full, absent)
    record, plaintext = admin(redis_server.url, lambda c, s: s.create("guess-model", "meter", ["some-other-model"]))
    for _ in range(2):
        assert code_of(lambda: stub.Generate(request, metadata=auth(plaintext), timeout=30)) == \
            grpc.StatusCode.PERMISSION_DENIED
    wait_until(lambda: metrics.value(metrics.scrape(main_router.metrics_port), "llamagrid_router_background_tasks")
               == 0, "the router's refunds and settlements to end")
    assert levels(redis_server.url, record.key_id) == [None, None]

    # revoked after a first request: UNAUTHENTICATED, the guessed charge refunded to the exact earlier levels
    key = new_keys(redis_server.url, {"meter": "meter"})["meter"]
    used = _used(stub.Generate(request, metadata=auth(key.plaintext), timeout=30))
    before = [999, 1_000_000 - used]
    wait_until(lambda: levels(redis_server.url, key.key_id) == pytest.approx(before, abs=0.01),
               "the first call's settlement")
    admin(redis_server.url, lambda c, s: s.revoke(key.key_id))
    assert code_of(lambda: stub.Generate(request, metadata=auth(key.plaintext), timeout=30)) == \
        grpc.StatusCode.UNAUTHENTICATED
    # the guessed charge was applied before the refusal; its refund runs in the background
    wait_until(lambda: levels(redis_server.url, key.key_id) == pytest.approx(before, abs=0.01),
               "the wrong guess's refund")

    # moved to another tier: served under the new tier's limits
    key = new_keys(redis_server.url, {"meter": "meter"})["meter"]
    _, call = stub.Generate.with_call(request, metadata=auth(key.plaintext), timeout=30)
    assert dict(call.initial_metadata())["x-ratelimit-limit-requests"] == "1000"
    admin(redis_server.url, lambda c, s: c.hset(f"lg:key:{key.key_id}", "tier", "limited"))
    _, call = stub.Generate.with_call(request, metadata=auth(key.plaintext), timeout=30)
    assert dict(call.initial_metadata())["x-ratelimit-limit-requests"] == "3"
