"""The router under load and faults: real routers, real worker processes, real redis-servers, real gRPC sockets.

Two tiny workers serve the whole module. Routers are started per test (on their own event loop in a thread), with
a WorkerPool the test keeps a handle on, so health as the router sees it can be read without guessing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from ratelimit.limiter import connect
from ratelimit.policy import FailurePolicy
from ratelimit.redis_server import RedisServer
from router.config import RouterConfig
from router.costs import estimate_text
from router.keys import ApiKeyStore
from tests.service import router_harness
from tests.service.router_harness import auth, start_workers

WORKER_ARGS = ("--kv-cache-tokens", "2048", "--num-threads", "1")
NO_REFILL = 0.001  # units per minute: nothing refills within a test
TIERS = f"""
[tiers.pro]
requests_per_minute = 60000
tokens_per_minute = 100000000

[tiers.steady]  # plenty, without refill: its request bucket is a hash that stays in Redis
requests_per_minute = {NO_REFILL}
request_burst = 1000000
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
LONG = pb.SamplingParameters(max_new_tokens=2000, temperature=0.0, ignore_eos=True)  # seconds on the tiny model
HEALTH_TIMEOUT_S = 2.0  # the test routers' pools drop a worker whose Load stops answering this long


# ---- module fixtures: two workers, two redis-servers, a tier file


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def outage_redis():
    """A persistent redis-server (append-only file, fsync always) that the outage tests kill and restart."""
    server = RedisServer(persistent=True)
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def worker_logs(tmp_path_factory):
    base = tmp_path_factory.mktemp("load-worker-logs")
    return [base / f"worker{i}.stderr" for i in range(2)]


@pytest.fixture(scope="module")
def workers(tiny_model_dir, worker_logs):
    procs = start_workers(tiny_model_dir, worker_logs, *WORKER_ARGS)
    yield procs
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.proc.pid, signal.SIGCONT)  # in case a failed test left one stopped
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(lambda p: p.stop(), procs))


@pytest.fixture(scope="module")
def tiers_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("load-tiers") / "tiers.toml"
    path.write_text(TIERS)
    return path


@pytest.fixture(scope="module")
def worker_stubs(workers):
    channels = [grpc.insecure_channel(w.address) for w in workers]
    yield [wpb_grpc.WorkerStub(ch) for ch in channels]
    for ch in channels:
        ch.close()


# ---- helpers


@dataclass(frozen=True)
class Key:
    plaintext: str
    key_id: str


def new_keys(redis_url: str, specs: dict[str, str]) -> dict[str, Key]:
    """One fresh key per name (name -> tier), with its key id (the rate-limit key)."""

    async def make():
        client = connect(redis_url, timeout_s=2.0)
        try:
            store = ApiKeyStore(client)
            out = {}
            for name, tier in specs.items():
                record, plaintext = await store.create(f"load-{name}", tier, [])
                out[name] = Key(plaintext, record.key_id)
            return out
        finally:
            await client.aclose()

    return asyncio.run(make())


def serve_router(config: RouterConfig, *, num_workers: int):
    return router_harness.serve_router(config, num_workers=num_workers, health_timeout_s=HEALTH_TIMEOUT_S)


def router_config(redis_url: str, workers: str, tiers_path, **overrides) -> RouterConfig:
    return RouterConfig(port=0, workers=workers, redis_url=redis_url, tiers_path=tiers_path,
                        **{"redis_timeout_s": 0.5, **overrides})


@dataclass
class Outcome:
    router: int
    code: grpc.StatusCode
    initial: dict = field(default_factory=dict)
    trailing: dict = field(default_factory=dict)
    response: pb.GenerateResponse | None = None
    details: str = ""


async def _generate_many(addresses: list[str], key: str, request: pb.GenerateRequest, n: int,
                         timeout_s: float = 60.0) -> list[Outcome]:
    """`n` concurrent Generate calls, call i on router i % len(addresses)."""
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    try:
        stubs = [pb_grpc.InferenceStub(ch) for ch in channels]

        async def one(i: int) -> Outcome:
            which = i % len(stubs)
            call = stubs[which].Generate(request, metadata=auth(key), timeout=timeout_s)
            try:
                response = await call
                return Outcome(which, grpc.StatusCode.OK, dict(await call.initial_metadata()), response=response)
            except grpc.aio.AioRpcError as exc:
                return Outcome(which, exc.code(), trailing=dict(exc.trailing_metadata() or ()), details=exc.details())

        return await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        for ch in channels:
            await ch.close()


def generate_many(addresses, key, request, n, timeout_s=60.0) -> list[Outcome]:
    return asyncio.run(_generate_many(addresses, key, request, n, timeout_s))


def _code(fn) -> grpc.StatusCode:
    try:
        fn()
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


class SteadyLoad:
    """A thread sending small Generate calls back to back; records (started, ended, code) per call."""

    def __init__(self, address: str, key: str, timeout_s: float = 10.0) -> None:
        self.results: list[tuple[float, float, grpc.StatusCode]] = []
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(address)
        stub = pb_grpc.InferenceStub(self._channel)
        request = pb.GenerateRequest(inputs=["steady"], parameters=SHORT)

        def loop():
            while not self._stop.is_set():
                t0 = time.monotonic()
                code = _code(lambda: stub.Generate(request, metadata=auth(key), timeout=timeout_s))
                self.results.append((t0, time.monotonic(), code))
                time.sleep(0.01)

        self._thread = threading.Thread(target=loop, daemon=True)

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        self._channel.close()
        assert not self._thread.is_alive(), "a call of the steady load hung"

    def between(self, start: float, end: float) -> list[tuple[float, float, grpc.StatusCode]]:
        return [r for r in self.results if r[0] >= start and r[1] <= end]


def redis_ms(url: str) -> float:
    with redis.Redis.from_url(url) as client:
        seconds, micros = client.time()
        return seconds * 1000 + micros / 1000


def bucket_field(url: str, key_id: str, bucket: str, name: str) -> float | None:
    with redis.Redis.from_url(url) as client:
        raw = client.hget(f"rl:{{{key_id}}}:{bucket}", name)
    return None if raw is None else float(raw)


def worker_of(request_ids: list[str], worker_logs, timeout_s: float = 15.0) -> dict[str, int]:
    """request id -> index of the worker that logged its request_finished (waits until every one is logged)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = {}
        for index, path in enumerate(worker_logs):
            finished = [ln for ln in path.read_text(errors="replace").splitlines() if '"request_finished"' in ln]
            for rid in request_ids:
                if any(f'"{rid}"' in ln for ln in finished):
                    found[rid] = index
        if len(found) == len(request_ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def loads(worker_stubs) -> list[wpb.LoadResponse]:
    return [s.Load(wpb.LoadRequest(), timeout=5) for s in worker_stubs]


def wait_idle(worker_stubs, timeout_s: float = 5.0) -> list[wpb.LoadResponse]:
    """Until both workers run nothing and every KV block is free again (cached-but-unused blocks count as free)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = loads(worker_stubs)
        if all(x.num_running == 0 and x.num_waiting == 0 and x.num_free_blocks == x.num_total_blocks for x in now):
            return now
        assert time.monotonic() < deadline, f"workers did not give their KV blocks back: {now}"
        time.sleep(0.05)


# ---- 2. many clients on two routers sharing one Redis


def test_two_routers_admit_exactly_the_request_burst(redis_server, workers, tiers_path):
    keys = new_keys(redis_server.url, {"burst": "burst"})
    config = router_config(redis_server.url, ",".join(w.address for w in workers), tiers_path)
    with serve_router(config, num_workers=2) as r1, serve_router(config, num_workers=2) as r2:
        request = pb.GenerateRequest(inputs=["x"], parameters=SHORT)
        outcomes = generate_many([r1.address, r2.address], keys["burst"].plaintext, request, 60)
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
        again = generate_many([r2.address, r1.address], keys["burst"].plaintext, request, 2)
        assert [o.code for o in again] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2


def test_two_routers_admit_exactly_the_token_burst(redis_server, workers, tiers_path):
    keys = new_keys(redis_server.url, {"tokens": "tokens"})
    config = router_config(redis_server.url, ",".join(w.address for w in workers), tiers_path)
    # "the" is BOS + one token, plus the one generated: a request uses exactly what it reserves, so settlement
    # neither refunds (which could admit an 8th) nor charges excess (an early finisher's debit could starve a
    # later admission): the count depends on the admissions alone, whatever the timing
    request = pb.GenerateRequest(inputs=["the"], parameters=SHORT)
    cost = estimate_text("the", SHORT, 0)
    assert cost == 3  # 21 tokens fit 7 such requests exactly
    with serve_router(config, num_workers=2) as r1, serve_router(config, num_workers=2) as r2:
        outcomes = generate_many([r1.address, r2.address], keys["tokens"].plaintext, request, 40)
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
    level = bucket_field(redis_server.url, keys["tokens"].key_id, "req", "tokens")
    assert 993 <= level < 993.01


# ---- 3. Redis killed and restarted under load


def test_fail_open_serves_through_a_redis_outage_then_uses_redis_again(outage_redis, workers, tiers_path):
    keys = new_keys(outage_redis.url, {"pro": "steady", "lim_a": "limited", "lim_b": "limited"})
    config = router_config(outage_redis.url, ",".join(w.address for w in workers), tiers_path,
                           failure_policy=FailurePolicy.FAIL_OPEN, redis_timeout_s=0.05, fallback_cooldown_s=0.2)
    request = pb.GenerateRequest(inputs=["x"], parameters=SHORT)
    with serve_router(config, num_workers=2) as router, grpc.insecure_channel(router.address) as ch:
        stub = pb_grpc.InferenceStub(ch)

        def call(key: Key) -> grpc.StatusCode:
            return _code(lambda: stub.Generate(request, metadata=auth(key.plaintext), timeout=10))

        # with Redis up: lim_b spends its 3 requests, lim_a one of them (both become known to the router)
        assert [call(keys["lim_b"]) for _ in range(4)] == [grpc.StatusCode.OK] * 3 + [
            grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert call(keys["lim_a"]) == grpc.StatusCode.OK
        with SteadyLoad(router.address, keys["pro"].plaintext) as load:
            time.sleep(0.3)
            outage_redis.kill()
            killed_at = time.monotonic()
            try:
                time.sleep(0.6)
                # fail-open: the local bucket took over where lim_a's Redis bucket stood (2 left; this router is
                # the only one, so its share is the whole tier), not from full
                codes = [call(keys["lim_a"]) for _ in range(4)]
                time.sleep(0.3)
            finally:
                restarted_before = time.monotonic()
                outage_redis.start()
            restart_ms = redis_ms(outage_redis.url)
            assert codes == [grpc.StatusCode.OK] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
            # the router goes back to Redis by itself: the steady load's request bucket is written again
            deadline = time.monotonic() + 15
            while (bucket_field(outage_redis.url, keys["pro"].key_id, "req", "ts") or 0) < restart_ms:
                assert time.monotonic() < deadline, "the router never wrote to Redis again after it restarted"
                time.sleep(0.05)
            time.sleep(0.3)
        # lim_b was exhausted in Redis before the outage and not used since: only Redis' state can refuse it;
        # lim_a's 2 local admissions were written back to Redis when it came back
        assert call(keys["lim_b"]) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert call(keys["lim_a"]) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert call(keys["pro"]) == grpc.StatusCode.OK
    assert load.results and all(code == grpc.StatusCode.OK for _, _, code in load.results), \
        {str(c) for _, _, c in load.results}
    during = load.between(killed_at, restarted_before)
    assert len(during) >= 3, "the steady load made no progress during the outage"


def test_fail_closed_refuses_fast_during_a_redis_outage_and_recovers(outage_redis, workers, tiers_path):
    keys = new_keys(outage_redis.url, {"pro": "pro"})
    config = router_config(outage_redis.url, ",".join(w.address for w in workers), tiers_path,
                           failure_policy=FailurePolicy.FAIL_CLOSED, redis_timeout_s=0.05, fallback_cooldown_s=0.2)
    request = pb.GenerateRequest(inputs=["x"], parameters=SHORT)
    with serve_router(config, num_workers=2) as router, grpc.insecure_channel(router.address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        stub.Generate(request, metadata=auth(keys["pro"].plaintext), timeout=10)
        with SteadyLoad(router.address, keys["pro"].plaintext) as load:
            time.sleep(0.3)
            outage_redis.kill()
            killed_at = time.monotonic()
            try:
                time.sleep(0.5)
                probes = []
                for _ in range(5):
                    t0 = time.monotonic()
                    code = _code(lambda: stub.Generate(request, metadata=auth(keys["pro"].plaintext), timeout=10))
                    probes.append((code, time.monotonic() - t0))
                time.sleep(0.3)
            finally:
                restarted_before = time.monotonic()
                outage_redis.start()
            deadline = time.monotonic() + 15
            while _code(lambda: stub.Generate(request, metadata=auth(keys["pro"].plaintext), timeout=10)) != \
                    grpc.StatusCode.OK:
                assert time.monotonic() < deadline, "requests never succeeded again after Redis restarted"
                time.sleep(0.05)
            recovered_at = time.monotonic()
            time.sleep(0.3)
        for code, took in probes:
            assert code == grpc.StatusCode.UNAVAILABLE
            assert took < 1.0, f"a refusal took {took:.3f} s"
        during = load.between(killed_at + 0.3, restarted_before)
        assert during, "the steady load made no progress during the outage"
        assert all(code == grpc.StatusCode.UNAVAILABLE and end - start < 1.0 for start, end, code in during)
        after = [r for r in load.results if r[0] >= recovered_at]
        assert after and all(code == grpc.StatusCode.OK for _, _, code in after)
        assert [_code(lambda: stub.Generate(request, metadata=auth(keys["pro"].plaintext), timeout=10))
                for _ in range(3)] == [grpc.StatusCode.OK] * 3


# ---- the main router over both workers (tests 4, 6, 7, 8)


@pytest.fixture(scope="module")
def main_router(redis_server, workers, tiers_path):
    # heartbeats into the router registry are rare here, so the Redis round trips of a call can be counted alone
    config = router_config(redis_server.url, ",".join(w.address for w in workers), tiers_path,
                           router_heartbeat_s=600.0)
    with serve_router(config, num_workers=2) as router:
        yield router


@pytest.fixture(scope="module")
def pro_key(redis_server):
    return new_keys(redis_server.url, {"pro": "pro"})["pro"]


@pytest.fixture(scope="module")
def stub(main_router):
    with grpc.insecure_channel(main_router.address) as ch:
        yield pb_grpc.InferenceStub(ch)


# ---- 8. CountTokens and ListModels are metered


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
    deadline = time.monotonic() + 10
    while abs(bucket_field(redis_server.url, key.key_id, "tok", "tokens") - (1_000_000 - used - counted)) > 0.01:
        assert time.monotonic() < deadline, "settlements never brought the token bucket to the exact usage"
        time.sleep(0.05)
    assert bucket_field(redis_server.url, key.key_id, "req", "tokens") == pytest.approx(1000 - 11, abs=0.01)


# ---- 7. chat turns reuse the earlier turns' KV blocks


def test_chat_turns_reuse_cached_blocks(stub, pro_key):
    params = pb.SamplingParameters(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    opening = f"session {uuid.uuid4().hex}: " + "tell me a long story about the cat and the dog " * 3
    turns = [opening, "and then what happened next?", "how does it end?"]
    turn_done = threading.Event()

    def requests():
        for i, text in enumerate(turns):
            if i:
                assert turn_done.wait(30)
                turn_done.clear()
            yield pb.ChatRequest(turn=pb.ChatTurn(messages=[pb.ChatMessage(role="user", content=text)],
                                                  parameters=params))

    ends = []
    for event in stub.Chat(requests(), metadata=auth(pro_key.plaintext), timeout=60):
        if event.HasField("end"):
            ends.append(event.end)
            turn_done.set()
    assert [e.finish_reason for e in ends] == [pb.LENGTH] * 3
    usage = [e.usage for e in ends]
    assert usage[0].cached_prompt_tokens == 0  # a fresh session: nothing to reuse
    for prev, cur in zip(usage, usage[1:], strict=False):
        seen = prev.prompt_tokens + prev.completion_tokens  # the previous turn's prompt and reply
        assert cur.prompt_tokens > seen
        # every full 16-token block of what the worker computed last turn is served from its cache
        assert seen - 16 <= cur.cached_prompt_tokens <= cur.prompt_tokens, (prev, cur)
        assert cur.cached_prompt_tokens % 16 == 0


# ---- 6. deadlines and cancels reach the worker, which gives its KV blocks back


def _running_somewhere(worker_stubs, timeout_s: float = 5.0) -> wpb.LoadResponse:
    deadline = time.monotonic() + timeout_s
    while True:
        busy = [x for x in loads(worker_stubs) if x.num_running >= 1 and x.num_free_blocks < x.num_total_blocks]
        if busy:
            return busy[0]
        assert time.monotonic() < deadline, "the long request never showed up on a worker"
        time.sleep(0.02)


def test_client_deadline_frees_the_workers_kv_blocks(stub, pro_key, worker_stubs):
    wait_idle(worker_stubs)
    stream = stub.GenerateStream(pb.GenerateRequest(inputs=["go on and on"], parameters=LONG),
                                 metadata=auth(pro_key.plaintext), timeout=1.5)
    next(stream)
    _running_somewhere(worker_stubs)
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(worker_stubs, timeout_s=5.0)


def test_client_cancel_frees_the_workers_kv_blocks(stub, pro_key, worker_stubs):
    wait_idle(worker_stubs)
    stream = stub.GenerateStream(pb.GenerateRequest(inputs=["go on and on"], parameters=LONG),
                                 metadata=auth(pro_key.plaintext), timeout=60)
    next(stream)
    _running_somewhere(worker_stubs)
    stream.cancel()
    wait_idle(worker_stubs, timeout_s=5.0)


# ---- 4. balancing spreads load and avoids an unhealthy worker


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


def test_balancing_spreads_load_and_avoids_a_hung_worker(main_router, pro_key, workers, worker_logs):
    tag = uuid.uuid4().hex[:8]
    main_router.wait_quiet()  # the pool's polled Load may still show the previous test's long request
    ids = _stream_many(main_router.address, pro_key.plaintext, f"spread-{tag}", 12)
    placed = worker_of(ids, worker_logs)
    assert len(placed) == 12
    counts = [list(placed.values()).count(i) for i in (0, 1)]
    assert min(counts) >= 3, f"concurrent requests were not spread over both workers: {counts}"

    hung = workers[1]
    os.kill(hung.proc.pid, signal.SIGSTOP)
    try:
        main_router.wait_health(hung.address, False)  # its Load stops answering: dropped after the health timeout
        ids = _stream_many(main_router.address, pro_key.plaintext, f"avoid-{tag}", 8)
        placed = worker_of(ids, worker_logs)
        assert placed == {rid: 0 for rid in ids}
    finally:
        os.kill(hung.proc.pid, signal.SIGCONT)
    main_router.wait_health(hung.address, True)  # answers again: back in rotation by itself
    main_router.wait_quiet()
    ids = _stream_many(main_router.address, pro_key.plaintext, f"back-{tag}", 12)
    placed = worker_of(ids, worker_logs)
    assert len(placed) == 12 and set(placed.values()) == {0, 1}


# ---- 5. retry before the first token, with a real failing worker process


class FailingWorker(wpb_grpc.WorkerServicer):
    """Speaks the worker contract, reports SERVING and a real worker's Info, fails every job (Run or Generate) with
    UNAVAILABLE before sending anything."""

    def __init__(self, info: wpb.InfoResponse) -> None:
        self.info = info
        self.generate_calls = 0
        self._lock = threading.Lock()

    def Generate(self, request_iterator, context):
        first = next(request_iterator)
        assert first.HasField("job")
        with self._lock:
            self.generate_calls += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "fake worker: engine unavailable")

    def Run(self, request, context):
        with self._lock:
            self.generate_calls += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "fake worker: engine unavailable")

    def Info(self, request, context):
        return self.info

    def Load(self, request, context):
        blocks = self.info.kv_capacity_tokens // max(self.info.block_size, 1)
        return wpb.LoadResponse(num_free_blocks=blocks, num_total_blocks=blocks)

    def CountTokens(self, request, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, "fake worker: engine unavailable")


@pytest.fixture(scope="module")
def failing_worker(worker_stubs):
    fake = FailingWorker(worker_stubs[0].Info(wpb.InfoRequest(), timeout=10))
    server = grpc.server(ThreadPoolExecutor(16))
    wpb_grpc.add_WorkerServicer_to_server(fake, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(0)


def test_unavailable_before_the_first_token_is_retried_on_another_worker(failing_worker, workers, redis_server,
                                                                         tiers_path, pro_key):
    fake, fake_address = failing_worker
    config = router_config(redis_server.url, f"{fake_address},{workers[0].address}", tiers_path)
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
    assert fake.generate_calls > 0, "the failing worker was never tried, so the retry path did not run"


def test_only_a_failing_worker_gives_unavailable(failing_worker, redis_server, tiers_path, pro_key):
    fake, fake_address = failing_worker
    config = router_config(redis_server.url, fake_address, tiers_path, retry_attempts=1)
    with serve_router(config, num_workers=1) as router, grpc.insecure_channel(router.address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        calls_before = fake.generate_calls
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(inputs=["a", "b"], parameters=SMALL), metadata=auth(pro_key.plaintext),
                          timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "worker" in err.value.details()  # says the workers failed, not some unrelated error
        with pytest.raises(grpc.RpcError) as err:
            list(stub.GenerateStream(pb.GenerateRequest(inputs=["a"], parameters=SMALL),
                                     metadata=auth(pro_key.plaintext), timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert fake.generate_calls > calls_before


# ---- 9. admission takes one Redis round trip (and settlement one)


@pytest.fixture()
def redis_sends(monkeypatch):
    """Every request the router's asyncio Redis clients send, as the list of command names in it (a pipeline is
    one send: one round trip)."""
    import re

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


def _settled(sends: list, quiet_s: float = 1.0) -> list:
    """The sends once no new one came for `quiet_s` (background refunds done)."""
    seen = -1
    while len(sends) != seen:
        seen = len(sends)
        time.sleep(quiet_s)
    return list(sends)


def test_admission_is_one_redis_round_trip_and_settlement_one(stub, redis_server, redis_sends):
    key = new_keys(redis_server.url, {"meter": "meter"})["meter"]
    request = pb.GenerateRequest(inputs=["one round trip"], parameters=SMALL)
    stub.Generate(request, metadata=auth(key.plaintext), timeout=30)  # this router's first sight of the key
    first = _settled(redis_sends)
    assert [s for s in first if "EVALSHA" in s or "HGETALL" in s], first
    for _ in range(3):
        redis_sends.clear()
        stub.GenerateStream(request, metadata=auth(key.plaintext), timeout=30).initial_metadata()
        response = stub.Generate(request, metadata=auth(key.plaintext), timeout=30)
        assert response.outputs[0].usage.completion_tokens > 0
        handshake = ("HELLO", "CLIENT", "AUTH", "SELECT")  # a new pooled connection's set-up, once per connection
        sends = [s for s in _settled(redis_sends) if s and s[0] not in handshake]
        admissions = [s for s in sends if "HGETALL" in s]
        refunds = [s for s in sends if "HGETALL" not in s]
        # two calls: each admitted by one send holding the key lookup and the charge; each settled by at most one
        # charge (a refund; none when the call used all it reserved) — the cancelled stream's refund at least
        assert admissions == [["HGETALL", "EVALSHA"]] * 2, sends
        assert refunds in ([["EVALSHA"]], [["EVALSHA"]] * 2), sends


def test_a_wrong_one_round_trip_guess_is_refunded(stub, redis_server, redis_sends):
    """The one-round-trip admission charges the tier the key had; when the lookup in the same round trip shows the
    key revoked, restricted to other models or moved to another tier, that charge is given back exactly."""
    request = pb.GenerateRequest(inputs=["guess"], parameters=SMALL)
    fields = [(b, f) for b in ("req", "tok") for f in ("tokens",)]

    async def admin(fn):
        client = connect(redis_server.url, timeout_s=2.0)
        try:
            return await fn(client, ApiKeyStore(client))
        finally:
            await client.aclose()

    # a key that may use another model only: PERMISSION_DENIED both times, its buckets untouched (full, absent)
    record, plaintext = asyncio.run(admin(lambda c, s: s.create("guess-model", "meter", ["some-other-model"])))
    for _ in range(2):
        assert _code(lambda: stub.Generate(request, metadata=auth(plaintext), timeout=30)) == \
            grpc.StatusCode.PERMISSION_DENIED
    _settled(redis_sends)
    assert [bucket_field(redis_server.url, record.key_id, b, f) for b, f in fields] == [None, None]

    # revoked after a first request: UNAUTHENTICATED, the guessed charge refunded to the exact earlier levels
    key = new_keys(redis_server.url, {"meter": "meter"})["meter"]
    stub.Generate(request, metadata=auth(key.plaintext), timeout=30)
    _settled(redis_sends)
    before = [bucket_field(redis_server.url, key.key_id, b, f) for b, f in fields]
    asyncio.run(admin(lambda c, s: s.revoke(key.key_id)))
    assert _code(lambda: stub.Generate(request, metadata=auth(key.plaintext), timeout=30)) == \
        grpc.StatusCode.UNAUTHENTICATED
    _settled(redis_sends)
    assert [bucket_field(redis_server.url, key.key_id, b, f) for b, f in fields] == pytest.approx(before, abs=0.01)

    # moved to another tier: served under the new tier's limits
    key = new_keys(redis_server.url, {"meter": "meter"})["meter"]
    _, call = stub.Generate.with_call(request, metadata=auth(key.plaintext), timeout=30)
    assert dict(call.initial_metadata())["x-ratelimit-limit-requests"] == "1000"
    asyncio.run(admin(lambda c, s: c.hset(f"lg:key:{key.key_id}", "tier", "limited")))
    _, call = stub.Generate.with_call(request, metadata=auth(key.plaintext), timeout=30)
    assert dict(call.initial_metadata())["x-ratelimit-limit-requests"] == "3"


# ---- 10. dispatch ahead of admission (router.ahead): hides the admission round trip, never serves a denied call


@contextlib.contextmanager
def two_routers_ahead(redis_url: str, workers, tiers_path):
    """Two routers on one Redis in front of `workers`: yields their channels and `ahead(outcome)`, the first
    router's llamagrid_router_dispatch_ahead_total{outcome}."""
    from common.ports import free_port
    from tests.service.test_metrics import scrape, value

    metrics_port = free_port()
    addresses = ",".join(w.address for w in workers)

    def ahead(outcome: str) -> float:
        return value(scrape(metrics_port), "llamagrid_router_dispatch_ahead_total", outcome=outcome)

    with serve_router(router_config(redis_url, addresses, tiers_path, metrics_port=metrics_port),
                      num_workers=len(workers)) as r1, \
            serve_router(router_config(redis_url, addresses, tiers_path), num_workers=len(workers)) as r2, \
            grpc.insecure_channel(r1.address) as c1, grpc.insecure_channel(r2.address) as c2:
        yield c1, c2, ahead


def test_dispatch_ahead_is_kept_when_admitted_and_cancelled_when_denied(redis_server, workers, worker_stubs,
                                                                        tiers_path):
    """A key this router verified, whose last decision left room, has its job sent while the admission is in
    flight; when the admission then says no (another router spent the burst; the key was revoked) the worker call
    is cancelled, the client gets only the denial and the worker gives every KV block back. A throttled key, a
    stranger and a forged secret are never sent ahead."""
    key = new_keys(redis_server.url, {"limited": "limited"})["limited"]  # 3 requests, no refill
    long = pb.GenerateRequest(inputs=["on and on"], parameters=LONG)  # would run for seconds if not cancelled

    with two_routers_ahead(redis_server.url, workers, tiers_path) as (c1, c2, ahead):
        s1, s2 = pb_grpc.InferenceStub(c1), pb_grpc.InferenceStub(c2)
        request = pb.GenerateRequest(inputs=["x"], parameters=SHORT)
        s1.Generate(request, metadata=auth(key.plaintext), timeout=30)  # first sight of the key: not ahead
        assert (ahead("kept"), ahead("cancelled")) == (0, 0)
        chunks = s1.GenerateStream(request, metadata=auth(key.plaintext), timeout=30)  # known, room for 2: ahead
        assert dict(chunks.initial_metadata())["x-ratelimit-remaining-requests"] == "1"  # headers still first
        assert [c.finish_reason for c in chunks][-1] != pb.FINISH_REASON_UNSPECIFIED
        assert (ahead("kept"), ahead("cancelled")) == (1, 0)
        s2.Generate(request, metadata=auth(key.plaintext), timeout=30)  # the other router spends the last one

        wait_idle(worker_stubs)
        with pytest.raises(grpc.RpcError) as err:  # r1 still thinks there is room: ahead, then denied
            list(s1.GenerateStream(long, metadata=auth(key.plaintext), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(dict(err.value.trailing_metadata())["retry-after-ms"]) > 0
        assert (ahead("kept"), ahead("cancelled")) == (1, 1)
        wait_idle(worker_stubs)  # the worker call was cancelled: nothing runs, every block is free
        with pytest.raises(grpc.RpcError) as err:  # now r1 knows the key is throttled: denied without going ahead
            s1.Generate(request, metadata=auth(key.plaintext), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (ahead("kept"), ahead("cancelled")) == (1, 1)

        # revoked after use: sent ahead once, cancelled, UNAUTHENTICATED; a forged secret is never sent ahead
        meter = new_keys(redis_server.url, {"meter": "meter"})["meter"]
        s1.Generate(request, metadata=auth(meter.plaintext), timeout=30)
        forged = meter.plaintext[:-4] + ("AAAA" if not meter.plaintext.endswith("AAAA") else "BBBB")
        assert _code(lambda: s1.Generate(request, metadata=auth(forged), timeout=30)) == \
            grpc.StatusCode.UNAUTHENTICATED
        assert (ahead("kept"), ahead("cancelled")) == (1, 1)
        # a wrong secret does not make the real key unknown here: its next call still goes ahead (and is kept)
        s1.Generate(request, metadata=auth(meter.plaintext), timeout=30)
        assert (ahead("kept"), ahead("cancelled")) == (2, 1)

        async def revoke(client):
            try:
                return await ApiKeyStore(client).revoke(meter.key_id)
            finally:
                await client.aclose()

        assert asyncio.run(revoke(connect(redis_server.url, timeout_s=2.0)))
        wait_idle(worker_stubs)
        assert _code(lambda: list(s1.GenerateStream(long, metadata=auth(meter.plaintext), timeout=30))) == \
            grpc.StatusCode.UNAUTHENTICATED
        assert (ahead("kept"), ahead("cancelled")) == (2, 2)
        wait_idle(worker_stubs)


def test_chat_turns_are_dispatched_ahead_and_cancelled_when_denied(redis_server, workers, worker_stubs, tiers_path):
    """A Chat turn whose key's last decision seen by this router left room starts on a worker while its admission
    is in flight, and streams exactly what it would otherwise (its last tokens ride with the worker's end); a turn
    sent ahead that is then denied (another router spent the burst) ends the session with RESOURCE_EXHAUSTED before
    any of its tokens, and the worker gives every KV block back."""
    key = new_keys(redis_server.url, {"limited": "limited"})["limited"]  # 3 requests, no refill
    params = pb.SamplingParameters(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    texts = [f"session {uuid.uuid4().hex}: hello there", "tell me more", "on and on"]
    turn_done = threading.Event()

    with two_routers_ahead(redis_server.url, workers, tiers_path) as (c1, c2, ahead):
        kept_after: list[tuple[float, float]] = []

        def requests():
            for i, text in enumerate(texts):
                if i:
                    assert turn_done.wait(30)
                    turn_done.clear()
                    kept_after.append((ahead("kept"), ahead("cancelled")))
                if i == 2:  # the other router spends the last request; r1 still thinks one is left
                    pb_grpc.InferenceStub(c2).Generate(pb.GenerateRequest(inputs=["x"], parameters=SHORT),
                                                       metadata=auth(key.plaintext), timeout=30)
                    wait_idle(worker_stubs)
                yield pb.ChatRequest(turn=pb.ChatTurn(messages=[pb.ChatMessage(role="user", content=text)],
                                                      parameters=params if i < 2 else LONG))

        call = pb_grpc.InferenceStub(c1).Chat(requests(), metadata=auth(key.plaintext), timeout=60)
        assert dict(call.initial_metadata())["x-ratelimit-remaining-requests"] == "2"
        tokens: list[int] = []
        ends = []
        with pytest.raises(grpc.RpcError) as err:
            for event in call:
                if event.HasField("delta"):
                    tokens.extend(event.delta.token_ids)
                else:
                    ends.append((len(tokens), event.end))
                    tokens = []
                    turn_done.set()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(dict(err.value.trailing_metadata())["retry-after-ms"]) > 0
        # turn 0: the key's first decision here, not ahead; turn 1: ahead and kept; turn 2: ahead, then denied
        assert kept_after == [(0, 0), (1, 0)]
        assert (ahead("kept"), ahead("cancelled")) == (1, 1)
        assert tokens == []  # nothing of the denied turn reached the client
        assert [(n, e.finish_reason, e.usage.completion_tokens) for n, e in ends] == [(8, pb.LENGTH, 8)] * 2
        assert ends[1][1].usage.prompt_tokens > ends[0][1].usage.prompt_tokens + 8  # the history rode along
        wait_idle(worker_stubs)  # the denied turn's worker call was cancelled: every block is free


def test_a_job_sent_ahead_is_cancelled_with_its_call(redis_server, workers, worker_stubs, tiers_path):
    """The client goes away while its admission round trip is still in flight (Redis stalled): the job already
    running on a worker is cancelled with the call, the worker gives every KV block back, and the charge Redis
    applies once it wakes is refunded whole (a client gone during its admission is not billed)."""
    from common.ports import free_port
    from tests.service.test_metrics import scrape, value

    metrics_port = free_port()
    key = new_keys(redis_server.url, {"meter": "meter"})["meter"]
    config = router_config(redis_server.url, ",".join(w.address for w in workers), tiers_path,
                           metrics_port=metrics_port, redis_timeout_s=10.0)  # a stalled Redis is waited for
    with serve_router(config, num_workers=2) as r, grpc.insecure_channel(r.address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        stub.Generate(pb.GenerateRequest(inputs=["x"], parameters=SHORT), metadata=auth(key.plaintext), timeout=30)
        wait_idle(worker_stubs)
        fields = [("req", "tokens"), ("tok", "tokens")]
        time.sleep(1.0)  # the warm-up call's settlement (a background refund) has landed
        before = [bucket_field(redis_server.url, key.key_id, b, f) for b, f in fields]
        stall = threading.Thread(target=lambda: redis.Redis.from_url(redis_server.url).execute_command(
            "DEBUG", "SLEEP", "3"))
        stall.start()
        time.sleep(0.1)  # Redis is asleep: the admission waits
        stream = stub.GenerateStream(pb.GenerateRequest(inputs=["on and on"], parameters=LONG),
                                     metadata=auth(key.plaintext), timeout=30)
        _running_somewhere(worker_stubs, timeout_s=2.5)  # sent ahead: running before its admission is decided
        stream.cancel()
        stall.join()
        wait_idle(worker_stubs)
        deadline = time.monotonic() + 10
        while (now := [bucket_field(redis_server.url, key.key_id, b, f) for b, f in fields]) != pytest.approx(
                before, abs=0.01):
            assert time.monotonic() < deadline, f"the abandoned admission was not refunded: {before} -> {now}"
            time.sleep(0.1)
        families = scrape(metrics_port)
        assert value(families, "llamagrid_router_dispatch_ahead_total", outcome="cancelled") == 1
        assert value(families, "llamagrid_router_dispatch_ahead_total", outcome="kept") == 0
