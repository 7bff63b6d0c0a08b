"""Streams through the router: a slow client's tokens are coalesced without holding anyone else back, and every way a
client stops a stream (deadline, cancel, CancelTurn) reaches the worker, which frees what the job held. A real
router in a thread, a real redis-server, fake workers that record how each call ended."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from router.config import RouterConfig
from router.outbox import Outbox
from tests.support.router import auth, new_keys, serve_router
from tests.support.waits import wait_until

GREEDY = pb.SamplingParameters(max_new_tokens=8, temperature=0.0)
LONG = pb.SamplingParameters(max_new_tokens=2000, temperature=0.0, ignore_eos=True)  # seconds on a fake worker


@pytest.fixture(scope="module")
def workers(module_fakes):
    return module_fakes.start_many(2)


@pytest.fixture(scope="module")
def key(redis_server):
    return new_keys(redis_server.url, {"pro": "pro"})["pro"].plaintext


@pytest.fixture(scope="module")
def router(redis_server, workers, key):
    config = RouterConfig(port=0, workers=",".join(w.address for w in workers), redis_url=redis_server.url,
                          redis_timeout_s=0.5)
    with serve_router(config, num_workers=2) as handle:
        yield handle.address


@pytest.fixture(scope="module")
def stub(router):
    with grpc.insecure_channel(router) as ch:
        yield pb_grpc.InferenceStub(ch)


def _job(workers, request_id: str):
    return wait_until(lambda: next((j for w in workers for j in w.jobs if j.request_id == request_id), None),
                      f"job {request_id} on a worker")


def _wait_idle(workers) -> None:
    for w in workers:
        w.wait_idle()
        load = w.load()
        assert load.num_running == load.num_waiting == 0 and load.num_free_blocks == load.num_total_blocks, load


def test_outbox_merges_deltas_per_index_and_keeps_ends_in_order():
    def delta(text, ids):
        return wpb.WorkerEvent(delta=wpb.TokenDelta(text=text, token_ids=ids))

    async def body():
        box = Outbox()
        box.put_event(0, delta("a", [1]))
        box.put_event(1, delta("x", [9]))
        box.put_event(0, delta("b", [2]))
        box.put_event(0, wpb.WorkerEvent(finished=wpb.Finished()))
        box.put_event(0, delta("late", [3]))  # a new delta after an end starts a new message
        box.put("marker")
        assert len(box) == 5 and box.merged == 1
        out = [await box.get() for _ in range(5)]
        assert [(i, e.delta.text if not isinstance(e, str) and e.HasField("delta") else e) for i, e in out[:2]] == [
            (0, "ab"), (1, "x")]
        assert list(out[0][1].delta.token_ids) == [1, 2]
        assert out[2][1].HasField("finished") and out[3][1].delta.text == "late" and out[4] == (None, "marker")
        box.put_event(1, delta("y", [8]))  # the taken delta of index 1 is not merged into any more
        assert (await box.get())[1].delta.text == "y"

    asyncio.run(body())


def test_a_stalled_client_gets_coalesced_tokens_and_holds_nobody_back(router, key, workers):
    """A client that stops reading: its tokens pile up in the router as a few merged messages (the stream's flow
    control window is kept small so the router feels the back-pressure), while another client is served."""
    params = pb.SamplingParameters(max_new_tokens=300, temperature=0.0, ignore_eos=True)
    request = pb.GenerateRequest(inputs=["a story"], parameters=params)
    small_window = [("grpc.http2.lookahead_bytes", 256), ("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(router) as fast_ch:
        reference = list(pb_grpc.InferenceStub(fast_ch).GenerateStream(request, metadata=auth(key), timeout=120))
    with grpc.insecure_channel(router, options=small_window) as slow_ch, grpc.insecure_channel(router) as fast_ch:
        slow = pb_grpc.InferenceStub(slow_ch).GenerateStream(request, timeout=120,
                                                             metadata=(*auth(key), ("x-request-id", "stalled")))
        first = next(slow)  # then stall
        others_done = threading.Event()

        def other_client():
            for _ in range(3):
                out = pb_grpc.InferenceStub(fast_ch).Generate(pb.GenerateRequest(inputs=["hi"], parameters=GREEDY),
                                                              metadata=auth(key), timeout=60)
                assert out.outputs[0].usage.completion_tokens > 0
            others_done.set()

        t = threading.Thread(target=other_client)
        t.start()
        assert others_done.wait(60), "another client was held back by a stalled one"
        # the stalled stream's worker generates into the router meanwhile, to its end
        wait_until(lambda: _job(workers, "stalled/0").outcome == "finished", "the stalled stream's job to finish",
                   60)
        rest = [first, *slow]
        t.join()
    text = "".join(c.text for c in rest)
    ids = [t for c in rest for t in c.token_ids]
    assert ids == [t for c in reference for t in c.token_ids] and text == "".join(c.text for c in reference)
    assert len(ids) == 300
    assert len(rest) < len(ids) // 2, f"{len(rest)} messages for {len(ids)} tokens: nothing was coalesced"


def _running_somewhere(workers, request_id: str):
    return wait_until(lambda: next((j for w in workers for j in w.jobs if j.request_id == request_id
                                    and j.state == "running" and j.sent_token_ids), None),
                      f"{request_id} to run on a worker")


def test_client_deadline_ends_the_worker_call(stub, key, workers):
    _wait_idle(workers)
    stream = stub.GenerateStream(pb.GenerateRequest(inputs=["go on and on"], parameters=LONG), timeout=1.5,
                                 metadata=(*auth(key), ("x-request-id", "deadline")))
    next(stream)
    _running_somewhere(workers, "deadline/0")
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_idle(workers)  # nothing runs, every KV block is free
    job = _job(workers, "deadline/0")
    assert job.outcome == "call_cancelled" and len(job.sent_token_ids) < 2000
    assert job.time_remaining_s is not None and job.time_remaining_s < 2.5  # the client's deadline rode along
    assert job.deadline_unix_ms > 0


def test_client_cancel_ends_the_worker_call(stub, key, workers):
    _wait_idle(workers)
    stream = stub.GenerateStream(pb.GenerateRequest(inputs=["go on and on"], parameters=LONG), timeout=60,
                                 metadata=(*auth(key), ("x-request-id", "cancel-test")))
    next(stream)
    _running_somewhere(workers, "cancel-test/0")
    stream.cancel()
    wait_until(lambda: _job(workers, "cancel-test/0").ended, "the worker to end the cancelled client's job")
    assert _job(workers, "cancel-test/0").outcome == "call_cancelled"  # aborted, not run to its end
    _wait_idle(workers)


def test_chat_cancel_ends_the_turn_cancelled(stub, key, workers):
    cancel_now = threading.Event()
    params = pb.SamplingParameters(max_new_tokens=1000, temperature=0.0, ignore_eos=True)

    def gen():
        yield pb.ChatRequest(turn=pb.ChatTurn(messages=[pb.ChatMessage(role="user", content="talk")],
                                              parameters=params))
        assert cancel_now.wait(30)
        yield pb.ChatRequest(cancel=pb.CancelTurn())

    ends = []
    for event in stub.Chat(gen(), metadata=(*auth(key), ("x-request-id", "chat-cancel")), timeout=60):
        if event.HasField("delta"):
            cancel_now.set()
        else:
            ends.append(event.end)
    assert [e.finish_reason for e in ends] == [pb.CANCELLED]
    assert ends[0].usage.completion_tokens < 1000
    job = _job(workers, "chat-cancel/0")
    assert job.cancel_received and job.outcome == "cancelled"  # the worker was told, and ended the turn itself
