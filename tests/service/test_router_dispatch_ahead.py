"""Dispatch ahead of admission (router.ahead): a known key's job starts on a worker while its admission round trip
is in flight, which hides that round trip; a job whose admission then says no, or whose client leaves first, is
cancelled and never served. Two real routers on one real redis-server, fake workers that record every call."""

from __future__ import annotations

import contextlib
import threading
import uuid

import grpc
import pytest
import redis

from common.ports import free_port
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from router.config import RouterConfig
from tests.support.load import code_of, levels
from tests.support.metrics import scrape, value
from tests.support.router import admin, auth, config_for, new_keys, serve_router
from tests.support.waits import wait_until

NO_REFILL = 0.001  # units per minute: nothing refills within a test
TIERS = f"""
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
LONG = pb.SamplingParameters(max_new_tokens=2000, temperature=0.0, ignore_eos=True)  # seconds on a fake worker


@pytest.fixture(scope="module")
def workers(module_fakes):
    return module_fakes.start_many(2)


@pytest.fixture(scope="module")
def tiers_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ahead-tiers") / "tiers.toml"
    path.write_text(TIERS)
    return path


def _config(redis_url: str, workers, tiers_path, **overrides) -> RouterConfig:
    return config_for(workers, redis_url, tiers_path, **overrides)


def wait_idle(workers) -> None:
    """Until no job runs on any worker (every call the routers made has ended) and every KV block is free."""
    for w in workers:
        w.wait_idle()
        load = w.load()
        assert load.num_free_blocks == load.num_total_blocks, load


@contextlib.contextmanager
def two_routers_ahead(redis_url: str, workers, tiers_path):
    """Two routers on one Redis in front of `workers`: yields their channels and `ahead(outcome)`, the first
    router's llamagrid_router_dispatch_ahead_total{outcome}."""
    metrics_port = free_port()

    def ahead(outcome: str) -> float:
        return value(scrape(metrics_port), "llamagrid_router_dispatch_ahead_total", outcome=outcome)

    with serve_router(_config(redis_url, workers, tiers_path, metrics_port=metrics_port),
                      num_workers=len(workers)) as r1, \
            serve_router(_config(redis_url, workers, tiers_path), num_workers=len(workers)) as r2, \
            grpc.insecure_channel(r1.address) as c1, grpc.insecure_channel(r2.address) as c2:
        yield c1, c2, ahead


def _long_jobs(workers, request_id: str) -> list:
    return [j for w in workers for j in w.jobs_matching(request_id)]


def _none_served(workers, request_id: str) -> bool:
    """Whether every call of `request_id` that reached a worker was cancelled there (the router may also cancel
    one before it arrives)."""
    return all(j.outcome == "call_cancelled" for j in _long_jobs(workers, request_id))


def test_dispatch_ahead_is_kept_when_admitted_and_cancelled_when_denied(redis_server, workers, tiers_path):
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

        wait_idle(workers)
        with pytest.raises(grpc.RpcError) as err:  # r1 still thinks there is room: ahead, then denied
            list(s1.GenerateStream(long, metadata=(*auth(key.plaintext), ("x-request-id", "denied-ahead")),
                                   timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(dict(err.value.trailing_metadata())["retry-after-ms"]) > 0
        assert (ahead("kept"), ahead("cancelled")) == (1, 1)
        wait_idle(workers)  # the worker call was cancelled: nothing runs, every block is free
        assert _none_served(workers, "denied-ahead")
        with pytest.raises(grpc.RpcError) as err:  # now r1 knows the key is throttled: denied without going ahead
            s1.Generate(request, metadata=auth(key.plaintext), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (ahead("kept"), ahead("cancelled")) == (1, 1)

        # revoked after use: sent ahead once, cancelled, UNAUTHENTICATED; a forged secret is never sent ahead
        meter = new_keys(redis_server.url, {"meter": "meter"})["meter"]
        s1.Generate(request, metadata=auth(meter.plaintext), timeout=30)
        forged = meter.plaintext[:-4] + ("AAAA" if not meter.plaintext.endswith("AAAA") else "BBBB")
        assert code_of(lambda: s1.Generate(request, metadata=auth(forged), timeout=30)) == \
            grpc.StatusCode.UNAUTHENTICATED
        assert (ahead("kept"), ahead("cancelled")) == (1, 1)
        # a wrong secret does not make the real key unknown here: its next call still goes ahead (and is kept)
        s1.Generate(request, metadata=auth(meter.plaintext), timeout=30)
        assert (ahead("kept"), ahead("cancelled")) == (2, 1)

        assert admin(redis_server.url, lambda c, s: s.revoke(meter.key_id))
        wait_idle(workers)
        assert code_of(lambda: s1.GenerateStream(long, metadata=(*auth(meter.plaintext),
                                                                 ("x-request-id", "revoked-ahead")), timeout=30)) == \
            grpc.StatusCode.UNAUTHENTICATED
        assert (ahead("kept"), ahead("cancelled")) == (2, 2)
        wait_idle(workers)
        assert _none_served(workers, "revoked-ahead")


def test_chat_turns_are_dispatched_ahead_and_cancelled_when_denied(redis_server, workers, tiers_path):
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
                    wait_idle(workers)
                yield pb.ChatRequest(turn=pb.ChatTurn(messages=[pb.ChatMessage(role="user", content=text)],
                                                      parameters=params if i < 2 else LONG))

        call = pb_grpc.InferenceStub(c1).Chat(requests(), metadata=(*auth(key.plaintext),
                                                                    ("x-request-id", "chat-ahead")), timeout=60)
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
        wait_idle(workers)  # the denied turn's worker call was cancelled: every block is free
        assert _none_served(workers, "chat-ahead/2")


def test_a_job_sent_ahead_is_cancelled_with_its_call(redis_server, workers, tiers_path):
    """The client goes away while its admission round trip is still in flight (Redis holds every write): the job
    already running on a worker is cancelled with the call, the worker gives every KV block back, and the charge
    Redis applies once it resumes is refunded whole (a client gone during its admission is not billed)."""
    metrics_port = free_port()
    key = new_keys(redis_server.url, {"meter": "meter"})["meter"]
    config = _config(redis_server.url, workers, tiers_path, metrics_port=metrics_port,
                     redis_timeout_s=10.0)  # a stalled Redis is waited for
    with serve_router(config, num_workers=2) as r, grpc.insecure_channel(r.address) as ch, \
            redis.Redis.from_url(redis_server.url) as control:
        stub = pb_grpc.InferenceStub(ch)
        warm = stub.Generate(pb.GenerateRequest(inputs=["x"], parameters=SHORT), metadata=auth(key.plaintext),
                             timeout=30)
        used = warm.outputs[0].usage.prompt_tokens + warm.outputs[0].usage.completion_tokens
        wait_idle(workers)
        before = [999, 1_000_000 - used]
        wait_until(lambda: levels(redis_server.url, key.key_id) == pytest.approx(before, abs=0.01),
                   "the warm-up call's settlement (a background refund)")
        control.execute_command("CLIENT", "PAUSE", "10000", "WRITE")  # the admission's charge waits from now on
        try:
            stream = stub.GenerateStream(pb.GenerateRequest(inputs=["on and on"], parameters=LONG),
                                         metadata=(*auth(key.plaintext), ("x-request-id", "left-ahead")), timeout=30)
            # sent ahead: running before its admission is decided
            wait_until(lambda: [j for j in _long_jobs(workers, "left-ahead") if j.state == "running"],
                       "the job to run on a worker while its admission waits", 5)
            stream.cancel()
            # the router saw the client go while the admission still waited: it stopped the job it sent ahead
            wait_until(lambda: all(j.ended for j in _long_jobs(workers, "left-ahead")),
                       "the job sent ahead to be stopped")
        finally:
            control.execute_command("CLIENT", "UNPAUSE")
        wait_idle(workers)
        assert [j.outcome for j in _long_jobs(workers, "left-ahead")] == ["call_cancelled"]
        wait_until(lambda: levels(redis_server.url, key.key_id) == pytest.approx(before, abs=0.01),
                   "the abandoned admission to be refunded", describe=lambda: levels(redis_server.url, key.key_id))
        families = scrape(metrics_port)
        assert value(families, "llamagrid_router_dispatch_ahead_total", outcome="cancelled") == 1
        assert value(families, "llamagrid_router_dispatch_ahead_total", outcome="kept") == 0
