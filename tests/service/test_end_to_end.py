"""End to end on real workers (the session's pair, tiny model): what the router streams is what the model generates,
a Chat session's history carries from turn to turn and its earlier turns are served from the worker's KV cache,
and the worker's own counts and checks reach the client. Router logic alone is tested against fake workers."""

from __future__ import annotations

import threading
import uuid

import grpc
import pytest

from common.internal_auth import token_metadata
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from router.config import RouterConfig
from tests.support.router import auth, new_keys, serve_router
from tests.support.workers import INTERNAL_TOKEN

PARAMS = pb.SamplingParameters(max_new_tokens=4, temperature=0.0)


@pytest.fixture(scope="module")
def key(redis_server) -> str:
    return new_keys(redis_server.url, {"pro": "pro"})["pro"].plaintext


@pytest.fixture(scope="module")
def router(redis_server, real_workers):
    config = RouterConfig(port=0, workers=",".join(w.address for w in real_workers), redis_url=redis_server.url,
                          redis_timeout_s=0.5, internal_token=INTERNAL_TOKEN)  # (the second worker requires it)
    with serve_router(config, num_workers=2) as handle:
        yield handle


@pytest.fixture(scope="module")
def stub(router):
    with grpc.insecure_channel(router.address) as ch:
        yield pb_grpc.InferenceStub(ch)


def _run_on_worker(address: str, text: str, params: pb.SamplingParameters) -> tuple[list[int], str]:
    """Token ids and text of one job run on a worker directly (Worker.Run)."""
    with grpc.insecure_channel(address) as ch:
        events = list(wpb_grpc.WorkerStub(ch).Run(wpb.Job(request_id=f"direct-{uuid.uuid4().hex[:8]}", text=text,
                                                          parameters=params), timeout=60,
                                                  metadata=token_metadata(INTERNAL_TOKEN)))
    ids, text_out = [], []
    for e in events:
        delta = e.delta if e.HasField("delta") else e.finished.last_delta
        ids.extend(delta.token_ids)
        text_out.append(delta.text)
    return ids, "".join(text_out)


def test_router_output_is_the_workers_and_stream_equals_unary(stub, key, real_workers):
    req = pb.GenerateRequest(inputs=["one", "two two", "the cat sat on the mat"], parameters=PARAMS)
    unary = stub.Generate(req, metadata=auth(key), timeout=60)
    chunks = list(stub.GenerateStream(req, metadata=auth(key), timeout=60))
    finished = {c.index: c for c in chunks if c.finish_reason}
    assert set(finished) == {0, 1, 2}
    for i, text in enumerate(req.inputs):
        ids = [t for c in chunks if c.index == i for t in c.token_ids]
        assert finished[i].usage.completion_tokens == len(ids) > 0
        assert ids == list(unary.outputs[i].token_ids)
        assert "".join(c.text for c in chunks if c.index == i) == unary.outputs[i].text
        assert finished[i].token_ids  # the last tokens ride with the end (Finished.last_delta)
        for worker in real_workers:  # greedy: exactly what either replica generates for the text by itself
            assert _run_on_worker(worker.address, text, PARAMS) == (ids, unary.outputs[i].text)


def _chat(stub, key: str, turns: list[str], params: pb.SamplingParameters) -> list[pb.TurnEnd]:
    turn_done = threading.Event()

    def requests():
        for i, text in enumerate(turns):
            if i:
                assert turn_done.wait(30)
                turn_done.clear()
            yield pb.ChatRequest(turn=pb.ChatTurn(messages=[pb.ChatMessage(role="user", content=text)],
                                                  parameters=params))

    ends = []
    for event in stub.Chat(requests(), metadata=auth(key), timeout=60):
        if event.HasField("end"):
            ends.append(event.end)
            turn_done.set()
    return ends


def test_chat_two_turns_on_one_session(stub, key):
    ends = _chat(stub, key, ["hi", "more"], PARAMS)
    assert len(ends) == 2
    # the second turn's prompt contains the whole first turn (history) plus the new message
    assert ends[1].usage.prompt_tokens > ends[0].usage.prompt_tokens + ends[0].usage.completion_tokens


def test_chat_turns_reuse_cached_blocks(stub, key, router):
    router.wait_quiet()
    params = pb.SamplingParameters(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    opening = f"session {uuid.uuid4().hex}: " + "tell me a long story about the cat and the dog " * 3
    ends = _chat(stub, key, [opening, "and then what happened next?", "how does it end?"], params)
    assert [e.finish_reason for e in ends] == [pb.LENGTH] * 3
    usage = [e.usage for e in ends]
    assert usage[0].cached_prompt_tokens == 0  # a fresh session: nothing to reuse
    for prev, cur in zip(usage, usage[1:], strict=False):
        seen = prev.prompt_tokens + prev.completion_tokens  # the previous turn's prompt and reply
        assert cur.prompt_tokens > seen
        # every full 16-token block of what the worker computed last turn is served from its cache
        assert seen - 16 <= cur.cached_prompt_tokens <= cur.prompt_tokens, (prev, cur)
        assert cur.cached_prompt_tokens % 16 == 0


def test_count_tokens_and_list_models(stub, key, real_workers):
    models = stub.ListModels(pb.ListModelsRequest(), metadata=auth(key), timeout=10).models
    assert len(models) == 1 and models[0].max_context > 0
    count = stub.CountTokens(pb.CountTokensRequest(text="hello world"), metadata=auth(key), timeout=10)
    assert count.count > 0 and count.max_context == models[0].max_context
    with grpc.insecure_channel(real_workers[0].address) as ch:  # the worker's own count, passed on as it is
        direct = wpb_grpc.WorkerStub(ch).CountTokens(pb.CountTokensRequest(text="hello world"), timeout=10)
    assert (direct.count, direct.max_context) == (count.count, count.max_context)


def test_bad_parameters_pass_through_as_invalid_argument(stub, key):
    bad = pb.SamplingParameters(max_new_tokens=4, temperature=-1.0)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(inputs=["x"], parameters=bad), metadata=auth(key), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in err.value.details()
