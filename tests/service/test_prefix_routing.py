"""Cache-aware routing on real workers (tiny model) and real routers: a prompt goes where its prefix is cached, two
routers side by side both see the workers' caches, and a killed worker's view is dropped at once and rebuilt from
the restarted worker's (empty) snapshot."""

from __future__ import annotations

import random
import time
import uuid

import grpc
import pytest

from common.internal_auth import INTERNAL_TOKEN_ENV
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from router.config import RouterConfig
from tests.support.calls import Chat, turn
from tests.support.router import auth, new_keys, serve_router
from tests.support.waits import wait_until
from tests.support.workers import INTERNAL_TOKEN, start_real_workers

PARAMS = pb.SamplingParameters(max_new_tokens=2, temperature=0.0, ignore_eos=True)
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]


@pytest.fixture(scope="module")
def key(redis_server) -> str:
    return new_keys(redis_server.url, {"pro": "pro"})["pro"].plaintext


def _config(workers, redis_url: str) -> RouterConfig:
    return RouterConfig(port=0, workers=",".join(w.address for w in workers), redis_url=redis_url,
                        redis_timeout_s=0.5, internal_token=INTERNAL_TOKEN, routing="cache")


def _views(router) -> dict[str, int]:
    """Worker address -> blocks cached, for the workers whose cache this router knows."""

    async def read():
        return dict(router.pool.cached_blocks())

    return router.on_loop(read)


def _predicted(router, model: str, text: str) -> dict[str, int]:
    async def read():
        blocks = router.pool.prompt_blocks(model, text)
        return router.pool.cached_tokens(model, blocks) if blocks is not None else {}

    return router.on_loop(read)


def _generate(address: str, key: str, text: str) -> pb.Usage:
    with grpc.insecure_channel(address) as ch:
        reply = pb_grpc.InferenceStub(ch).Generate(pb.GenerateRequest(inputs=[text], parameters=PARAMS),
                                                   metadata=auth(key), timeout=60)
    return reply.outputs[0].usage


def _prefix(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + f" {uuid.uuid4().hex}"


def test_a_shared_prefix_goes_where_it_is_cached_through_either_router(redis_server, real_workers, key):
    with serve_router(_config(real_workers, redis_server.url), num_workers=2) as one, \
            serve_router(_config(real_workers, redis_server.url), num_workers=2) as two:
        addresses = {w.address for w in real_workers}
        for router in (one, two):
            wait_until(lambda r=router: set(_views(r)) == addresses, "both workers' cache views", 15)
        model = one.pool.default_model()
        rng = random.Random(7)
        prefix = _prefix(rng, 120)  # about 20 blocks of 16 tokens, in no worker's cache yet
        assert all(v == 0 for v in _predicted(one, model, prefix + " first").values())
        first = _generate(one.address, key, prefix + " first question?")
        assert first.cached_prompt_tokens == 0
        # once the worker's events have reached both routers, each predicts the prefix on exactly one worker
        for router in (one, two):
            wait_until(lambda r=router: sorted(_predicted(r, model, prefix + " next").values())[-1] >= 16 * 15,
                       "the prefix to show in the router's view", 10)
        for i, router in enumerate((one, two, one, two)):
            text = f"{prefix} question number {i}?"
            predicted = _predicted(router, model, text)
            held = [a for a, n in predicted.items() if n]
            assert len(held) == 1, predicted
            usage = _generate(router.address, key, text)
            assert usage.cached_prompt_tokens == predicted[held[0]], (i, predicted, usage)


def test_a_killed_worker_is_forgotten_at_once_and_its_successor_starts_empty(redis_server, tiny_model_dir,
                                                                            tmp_path, key):
    args = ("--kv-cache-tokens", "4096", "--max-num-seqs", "8", "--num-threads", "1")
    env = {INTERNAL_TOKEN_ENV: INTERNAL_TOKEN}
    [worker] = start_real_workers(tiny_model_dir, [tmp_path / "w.log"], *args, env=env)
    successor = None
    try:
        with serve_router(_config([worker], redis_server.url), num_workers=1, health_timeout_s=2.0) as router:
            wait_until(lambda: worker.address in _views(router), "the worker's cache view", 15)
            _generate(router.address, key, _prefix(random.Random(1), 60))
            wait_until(lambda: _views(router).get(worker.address, 0) > 0, "cached blocks in the view", 10)
            port = int(worker.address.rsplit(":", 1)[1])
            worker.proc.kill()
            killed = time.monotonic()
            wait_until(lambda: worker.address not in _views(router), "the killed worker's view dropped", 1.0)
            dropped_after = time.monotonic() - killed
            # (the supervisor's restart, by hand: a new process on the same port)
            [successor] = start_real_workers(tiny_model_dir, [tmp_path / "w2.log"], *args, "--port", str(port),
                                             env=env)
            wait_until(lambda: _views(router).get(worker.address) == 0, "the successor's empty snapshot", 15)
            assert dropped_after < 1.0
    finally:
        worker.stop()
        if successor is not None:
            successor.stop()


def test_a_moved_chat_session_goes_where_its_transcript_is_cached(redis_server, tiny_model_dir, tmp_path, key):
    """Three workers. Session one's first turn runs on worker A; session two, the same first turn, on another worker
    X (so X caches the same transcript). A is killed: session one's next turn leaves A for the worker holding its
    transcript (X), not the empty third one, and reuses X's cache."""
    args = ("--kv-cache-tokens", "4096", "--max-num-seqs", "8", "--num-threads", "1")
    env = {INTERNAL_TOKEN_ENV: INTERNAL_TOKEN}
    workers = start_real_workers(tiny_model_dir, [tmp_path / f"w{i}.log" for i in range(3)], *args, env=env)
    by_address = {w.address: w for w in workers}
    params = pb.SamplingParameters(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    first = turn(_prefix(random.Random(3), 60), params=params)  # about 10 blocks: a cache hit shows in the usage
    sessions = []
    try:
        with serve_router(_config(workers, redis_server.url), num_workers=3, health_timeout_s=2.0) as router, \
                grpc.insecure_channel(router.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            wait_until(lambda: set(_views(router)) == set(by_address), "every worker's cache view", 15)
            one = Chat(stub, key)
            sessions.append(one)
            assert one.turn(first).usage.cached_prompt_tokens == 0
            wait_until(lambda: sum(n > 0 for n in _views(router).values()) == 1, "session one's blocks in view", 10)
            [a] = [addr for addr, n in _views(router).items() if n > 0]
            for _ in range(20):  # a new session's first turn is placed by load: open sessions until one is not on A
                two = Chat(stub, key)
                sessions.append(two)
                if two.turn(first).usage.cached_prompt_tokens == 0:
                    break
            else:
                pytest.fail("20 sessions all placed on worker A")
            wait_until(lambda: sum(n > 0 for n in _views(router).values()) == 2, "session two's blocks in view", 10)
            [x] = [addr for addr, n in _views(router).items() if n > 0 and addr != a]
            by_address[a].proc.kill()
            wait_until(lambda: a not in _views(router), "the killed worker's view dropped", 5)
            end = one.turn(turn("and then?", params=params))
            assert end.usage.cached_prompt_tokens >= 16 * 8, end.usage  # the transcript's blocks, cached on X
            assert _views(router)[x] > 0 and set(_views(router)) == set(by_address) - {a}
    finally:
        for chat in sessions:
            chat.cancel()
        for w in workers:
            w.stop()
