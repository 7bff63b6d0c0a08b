"""The router's failover against fake workers whose faults are scripted exactly: a replica that dies mid-stream again
and again (restarted each time, as a supervisor does) loses no request, a Chat session whose worker dies mid-reply
goes on elsewhere with its transcript, and a replica that crash-loops without ever serving stays out while the
others serve. Outputs are checked token for token against what an uninterrupted run produces. (A real replica
killed mid-load: test_failover.py.)"""

from __future__ import annotations

import asyncio
import random
import threading

import grpc
import pytest

from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from router.config import RouterConfig
from tests.support.fake_model import Fault, Script, encode_text, reply, token_text
from tests.support.fake_process import Respawner
from tests.support.router import RouterProcess, auth, create_keys, serve_router, wait_routable
from tests.support.waits import wait_until

TIERS = ("[tiers.load]\nrequests_per_minute = 1000000\ntokens_per_minute = 100000000\n"
         "max_concurrent_requests = 1000\n")  # the load's streams run all at once
# 10 tokens 30 ms apart before it dies: the router reads them while it takes the whole burst of calls, so the job
# is resumed mid-stream (tokens gRPC received but the router had not yet asked for go down with the connection)
DIES = Script(token_delay_s=0.03, faults=[Fault(kind="die", after_tokens=10, exit_code=86, times=1)])


def _requests(n: int, seed: int = 4) -> list[pb.GenerateRequest]:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "ran", "far", "away", "quickly"]
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(3, 40)))
        params = pb.SamplingParameters(max_new_tokens=rng.randint(16, 48), ignore_eos=True)
        if i % 2:
            params.temperature, params.top_p, params.seed = 0.8, 0.9, 1000 + i
        else:
            params.temperature = 0.0
        out.append(pb.GenerateRequest(inputs=[prompt], parameters=params))
    return out


def _expected(request: pb.GenerateRequest) -> tuple:
    """(token_ids, text, finish_reason, completion_tokens) of an uninterrupted run on a fake worker."""
    ids = reply(encode_text(request.inputs[0]), request.parameters, request.parameters.max_new_tokens)
    return tuple(ids), "".join(token_text(t) for t in ids), pb.LENGTH, len(ids)


def _run_load(address: str, key: str, requests: list[pb.GenerateRequest], tag: str) -> list[tuple]:
    """All requests at once as GenerateStream calls (x-request-id `{tag}-{i}`); per request (token_ids, text,
    finish_reason, completion_tokens)."""

    async def run():
        async with grpc.aio.insecure_channel(address) as ch:
            stub = pb_grpc.InferenceStub(ch)

            async def one(i: int, req: pb.GenerateRequest) -> tuple:
                ids, text, fin = [], [], None
                async for chunk in stub.GenerateStream(req, metadata=(*auth(key), ("x-request-id", f"{tag}-{i}")),
                                                       timeout=120):
                    ids.extend(chunk.token_ids)
                    text.append(chunk.text)
                    if chunk.finish_reason:
                        fin = chunk
                return tuple(ids), "".join(text), fin.finish_reason, fin.usage.completion_tokens

            return await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))

    return asyncio.run(run())


@pytest.fixture(scope="module")
def key(redis_server) -> str:
    return create_keys(redis_server.url, {"load": ("load", [])})["load"]


@pytest.fixture(scope="module")
def tiers_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("failover-tiers") / "tiers.toml"
    path.write_text(TIERS)
    return path


def test_a_replica_dying_again_and_again_mid_load_loses_nothing(fakes, redis_server, key, tiers_path, tmp_path):
    """Replica C dies (exit 86, as after repeated OOM) on the first job of every life, after 10 tokens; it is started
    again each time. Every request completes exactly as an uninterrupted run would have, those C was streaming
    resumed mid-stream elsewhere, and the router keeps trying the restarted replica."""
    a, b = fakes.start_many(2, lambda: Script(token_delay_s=0.01))
    c = Respawner(tmp_path / "c", DIES)
    router = None
    try:
        router = RouterProcess(tmp_path / "router.stderr", "--workers", f"{a.address},{b.address},{c.address}",
                               "--redis-url", redis_server.url, "--tiers", str(tiers_path), "--failover-wait", "60")
        wait_routable(router.address, key)
        router.wait_event("worker_healthy", where=lambda e: e["address"] == c.address)
        for tag, requests in (("dies", _requests(200)), ("after", _requests(40, seed=5))):
            if tag == "after":  # C's latest life (it runs no job, so it lives) is back in the router's pool
                router.wait_event("worker_healthy", where=lambda e: e["address"] == c.address, count=len(c.lives))
            outputs = _run_load(router.address, key, requests, tag)
            mismatches = [i for i, (got, req) in enumerate(zip(outputs, requests, strict=True))
                          if got != _expected(req)]
            assert not mismatches, f"{len(mismatches)} outputs differ from an uninterrupted run, e.g. {mismatches[0]}"
            failovers = router.events("worker_failover")
            resumed = [e for e in failovers if e["request_id"].startswith(f"{tag}-") and e.get("resumed_tokens")]
            assert resumed, f"no request of run {tag} was resumed mid-stream: {failovers}"
        assert c.exit_codes[:2] == [86, 86], c.exit_codes  # died, was restarted, was used and died again
        assert c.events("job_started", life=2), "the router never used the restarted replica"
    finally:
        if router is not None:
            router.stop()
        c.stop()


def _chat_turns(address: str, key: str, on_delta=None) -> list[tuple]:
    """Two turns of one Chat session; returns (token_ids, text, finish_reason) per turn."""
    params = pb.SamplingParameters(max_new_tokens=120, temperature=0.7, seed=77, ignore_eos=True)
    turn_done = threading.Event()

    def requests():
        for content in ("tell me a long story", "and then?"):
            turn_done.clear()
            yield pb.ChatRequest(turn=pb.ChatTurn(messages=[pb.ChatMessage(role="user", content=content)],
                                                  parameters=params))
            assert turn_done.wait(120)

    turns, ids, text = [], [], []
    with grpc.insecure_channel(address) as ch:
        for event in pb_grpc.InferenceStub(ch).Chat(requests(), metadata=(*auth(key), ("x-request-id", "moving")),
                                                    timeout=120):
            if event.HasField("delta"):
                ids.extend(event.delta.token_ids)
                text.append(event.delta.text)
                if on_delta is not None:
                    on_delta(len(turns), len(ids))
            else:
                turns.append((tuple(ids), "".join(text), event.end.finish_reason))
                ids, text = [], []
                turn_done.set()
    return turns


def test_chat_session_moves_mid_reply_with_its_transcript(fakes, redis_server, key, tiers_path):
    """The worker holding a Chat session dies while streaming a reply: the reply continues on another replica
    exactly as it would have, and the next turn (with the whole transcript) too."""
    workers = fakes.start_many(2, lambda: Script(token_delay_s=0.005))
    config = RouterConfig(port=0, workers=",".join(w.address for w in workers), redis_url=redis_server.url,
                          tiers_path=tiers_path, failover_wait_s=60.0)
    with serve_router(config, num_workers=2) as router:
        reference = _chat_turns(router.address, key)
        killed = []

        def on_delta(turn: int, num_ids: int) -> None:
            if turn == 0 and num_ids >= 20 and not killed:
                running = [w for w in workers if any(j.request_id == "moving/0" for j in w.active())]
                assert running, "no worker was found running the session"
                running[0].stop()  # every stream of it reset at once, as when a process dies
                killed.append(running[0])

        assert _chat_turns(router.address, key, on_delta) == reference
    assert killed, "the session's worker was never killed"
    survivor = next(w for w in workers if w is not killed[0])
    resumed = [j for j in survivor.jobs if j.request_id == "moving/0" and j.resume_token_ids]
    assert resumed and len(resumed[-1].resume_token_ids) >= 20  # the reply went on from where it stopped
    assert len(survivor.job("moving/1").history_token_ids) > len(resumed[-1].prompt_ids) + 120  # with its transcript


def test_a_cancel_after_the_session_moved_reaches_the_new_worker(fakes, redis_server, key, tiers_path):
    """A Chat turn moved mid-reply to another worker, then cancelled by the client: the new worker is told, and the
    turn ends CANCELLED."""
    workers = fakes.start_many(2, lambda: Script(token_delay_s=0.01))
    config = RouterConfig(port=0, workers=",".join(w.address for w in workers), redis_url=redis_server.url,
                          tiers_path=tiers_path, failover_wait_s=60.0)
    moved, cancel = threading.Event(), threading.Event()

    def requests():
        yield pb.ChatRequest(turn=pb.ChatTurn(messages=[pb.ChatMessage(role="user", content="go on")],
                                              parameters=pb.SamplingParameters(max_new_tokens=200, ignore_eos=True)))
        assert cancel.wait(30)
        yield pb.ChatRequest(cancel=pb.CancelTurn())

    ends, num_ids = [], 0
    with serve_router(config, num_workers=2) as router, grpc.insecure_channel(router.address) as ch:
        for event in pb_grpc.InferenceStub(ch).Chat(requests(), metadata=(*auth(key), ("x-request-id", "cancelled")),
                                                    timeout=60):
            if event.HasField("end"):
                ends.append(event.end)
                continue
            num_ids += len(event.delta.token_ids)
            if num_ids >= 10 and not moved.is_set():
                next(w for w in workers if w.active()).stop()
                moved.set()
            elif num_ids >= 20 and moved.is_set():  # streaming from the new worker
                cancel.set()
    survivor = next(w for w in workers if w.is_running)
    assert survivor.job("cancelled/0").cancel_received
    assert [e.finish_reason for e in ends] == [pb.CANCELLED]


def test_a_crash_looping_replica_stays_out_and_the_router_keeps_serving(fakes, redis_server, key, tiers_path,
                                                                        tmp_path):
    """A replica on a port the router lists that keeps crashing before it ever serves (up NOT_SERVING, then gone,
    then up again): the router never counts it healthy and serves every request from the others meanwhile."""
    workers = fakes.start_many(2)
    looping = Respawner(tmp_path / "looping", Script(serving=False), exit_after_s=0.3)
    router = None
    try:
        router = RouterProcess(tmp_path / "router.stderr", "--workers",
                               ",".join([*(w.address for w in workers), looping.address]),
                               "--redis-url", redis_server.url, "--tiers", str(tiers_path))
        wait_routable(router.address, key)
        requests = _requests(30)
        outputs = _run_load(router.address, key, requests, "looping")
        assert [o for o, r in zip(outputs, requests, strict=True) if o != _expected(r)] == []
        wait_until(lambda: len(looping.exit_codes) >= 2, "the looping replica to crash twice")
        assert set(looping.exit_codes) == {2}
        assert not [e for e in router.events("worker_healthy") if e["address"] == looping.address]
        assert not looping.events("job_started")
    finally:
        if router is not None:
            router.stop()
        looping.stop()
