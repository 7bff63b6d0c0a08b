"""Balancing: concurrent requests spread over the workers, a hung worker is left out until it answers again, and a
worker that fails before the first token is retried elsewhere. A real router in a thread (its pool's view of health
readable), a real redis-server, fake workers that record where every job ran."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from router.config import RouterConfig
from tests.support.fake_model import Fault, Script
from tests.support.load import generate_many
from tests.support.router import auth, new_keys, serve_router

TIERS = """
[tiers.pro]
requests_per_minute = 60000
tokens_per_minute = 100000000
"""
SMALL = pb.SamplingParameters(max_new_tokens=4, temperature=0.0)
HEALTH_TIMEOUT_S = 2.0  # the test routers' pools drop a worker whose Load stops answering this long


@pytest.fixture(scope="module")
def workers(module_fakes):
    return module_fakes.start_many(2)


@pytest.fixture(scope="module")
def failing(module_fakes):
    """A fake worker that speaks the contract, reports SERVING, and fails every job with UNAVAILABLE before sending
    anything."""
    return module_fakes.start(Script(faults=[Fault(kind="fail", code="UNAVAILABLE")]))


@pytest.fixture(scope="module")
def tiers_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("balancing-tiers") / "tiers.toml"
    path.write_text(TIERS)
    return path


@pytest.fixture(scope="module")
def pro_key(redis_server):
    return new_keys(redis_server.url, {"pro": "pro"}, prefix="load")["pro"]


def _config(redis_url: str, addresses: list[str], tiers_path, **overrides) -> RouterConfig:
    return RouterConfig(port=0, workers=",".join(addresses), redis_url=redis_url, tiers_path=tiers_path,
                        **{"redis_timeout_s": 0.5, **overrides})


@pytest.fixture(scope="module")
def main_router(redis_server, workers, tiers_path):
    with serve_router(_config(redis_server.url, [w.address for w in workers], tiers_path), num_workers=2,
                      health_timeout_s=HEALTH_TIMEOUT_S) as router:
        yield router


def _stream_many(address: str, key: str, prefix: str, n: int) -> list[str]:
    """`n` concurrent GenerateStream calls, each with its own x-request-id; all must finish. Returns the job ids."""

    async def run():
        async with grpc.aio.insecure_channel(address) as ch:
            s = pb_grpc.InferenceStub(ch)
            params = pb.SamplingParameters(max_new_tokens=24, temperature=0.0, ignore_eos=True)

            async def one(i: int):
                call = s.GenerateStream(pb.GenerateRequest(inputs=[f"story {i}"], parameters=params), timeout=30,
                                        metadata=(*auth(key), ("x-request-id", f"{prefix}-{i}")))
                return [c async for c in call]

            return await asyncio.gather(*(one(i) for i in range(n)))

    for chunks in asyncio.run(run()):
        assert chunks[-1].finish_reason == pb.LENGTH and chunks[-1].usage.completion_tokens == 24
    return [f"{prefix}-{i}/0" for i in range(n)]


def _placed(request_ids: list[str], workers) -> dict[str, int]:
    """request id -> index of the worker that finished it."""
    return {j.request_id: i for i, w in enumerate(workers) for j in w.jobs
            if j.request_id in request_ids and j.outcome == "finished"}


def test_balancing_spreads_load_and_avoids_a_hung_worker(main_router, pro_key, workers):
    tag = uuid.uuid4().hex[:8]
    main_router.wait_quiet()  # the pool's polled Load may still show a previous test's request
    ids = _stream_many(main_router.address, pro_key.plaintext, f"spread-{tag}", 12)
    placed = _placed(ids, workers)
    assert len(placed) == 12
    counts = [list(placed.values()).count(i) for i in (0, 1)]
    assert min(counts) >= 3, f"concurrent requests were not spread over both workers: {counts}"

    hung = workers[1]
    hung.freeze()  # answers nothing, its connections stay open (a stopped process)
    try:
        main_router.wait_health(hung.address, False)  # its Load stops answering: dropped after the health timeout
        ids = _stream_many(main_router.address, pro_key.plaintext, f"avoid-{tag}", 8)
        placed = _placed(ids, workers)
        assert placed == {rid: 0 for rid in ids}
    finally:
        hung.thaw()
    main_router.wait_health(hung.address, True)  # answers again: back in rotation by itself
    main_router.wait_quiet()
    ids = _stream_many(main_router.address, pro_key.plaintext, f"back-{tag}", 12)
    placed = _placed(ids, workers)
    assert len(placed) == 12 and set(placed.values()) == {0, 1}


def test_unavailable_before_the_first_token_is_retried_on_another_worker(failing, workers, redis_server,
                                                                         tiers_path, pro_key):
    config = _config(redis_server.url, [failing.address, workers[0].address], tiers_path)
    with serve_router(config, num_workers=2) as router:
        request = pb.GenerateRequest(inputs=["a", "b", "c", "d"], parameters=SMALL)
        outcomes = generate_many([router.address], pro_key.plaintext, request, 8)
        with grpc.insecure_channel(router.address) as ch:
            chunks = list(pb_grpc.InferenceStub(ch).GenerateStream(request, metadata=auth(pro_key.plaintext),
                                                                   timeout=30))
    for o in outcomes:
        assert o.code == grpc.StatusCode.OK, o.details
        assert all(out.usage.completion_tokens == 4 for out in o.response.outputs)
    assert sorted(c.index for c in chunks if c.finish_reason) == [0, 1, 2, 3]
    assert failing.jobs, "the failing worker was never tried, so the retry path did not run"
    assert {j.outcome for j in failing.jobs} == {"failed"}


def test_only_a_failing_worker_gives_unavailable(failing, redis_server, tiers_path, pro_key):
    config = _config(redis_server.url, [failing.address], tiers_path, retry_attempts=1)
    with serve_router(config, num_workers=1) as router, grpc.insecure_channel(router.address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        calls_before = len(failing.jobs)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(inputs=["a", "b"], parameters=SMALL), metadata=auth(pro_key.plaintext),
                          timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "worker" in err.value.details()  # says the workers failed, not some unrelated error
        with pytest.raises(grpc.RpcError) as err:
            list(stub.GenerateStream(pb.GenerateRequest(inputs=["a"], parameters=SMALL),
                                     metadata=auth(pro_key.plaintext), timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(failing.jobs) > calls_before
