"""The worker over real gRPC: both contracts, streaming, cancellation, health, bad input."""

from __future__ import annotations

import math
import queue
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.worker.v1 import worker_pb2 as wpb

SECRET = "zebra quartz marmalade"  # must never appear in the worker's logs


def params(**kw) -> pb.SamplingParameters:
    return pb.SamplingParameters(**kw)


def test_health_serving(channel):
    resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_generate_many_inputs(inference):
    req = pb.GenerateRequest(inputs=["Hello there", SECRET, "é ü 中文 🙂"],
                             parameters=params(max_new_tokens=12, temperature=0.0, ignore_eos=True))
    resp = inference.Generate(req, timeout=60)
    assert len(resp.outputs) == 3
    for out in resp.outputs:
        assert out.finish_reason == pb.LENGTH
        assert out.usage.completion_tokens == 12 == len(out.token_ids)
        assert out.usage.prompt_tokens > 1


def test_generate_stream_matches_unary(inference):
    req = pb.GenerateRequest(inputs=["The weather today", "Once upon a time"],
                             parameters=params(max_new_tokens=16, temperature=0.0, ignore_eos=True))
    unary = inference.Generate(req, timeout=60)
    texts, ids, finals = {0: "", 1: ""}, {0: [], 1: []}, {}
    for chunk in inference.GenerateStream(req, timeout=60):
        texts[chunk.index] += chunk.text
        ids[chunk.index] += list(chunk.token_ids)
        if chunk.finish_reason:
            finals[chunk.index] = chunk
    for i, out in enumerate(unary.outputs):
        assert texts[i] == out.text
        assert ids[i] == list(out.token_ids)
        assert finals[i].finish_reason == pb.LENGTH
        assert finals[i].usage.completion_tokens == 16


def test_an_inputs_last_tokens_ride_with_its_end(inference, internal):
    """Tokens produced in the step that ends a job come in the message that ends it (one message less): the
    public stream's last chunk; Worker.Run's Finished.last_delta."""
    p = params(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    chunks = list(inference.GenerateStream(pb.GenerateRequest(inputs=["The weather today"], parameters=p), timeout=60))
    # one token per step; steps a slow reader has not taken yet are merged into one chunk (so up to 3 chunks),
    # and the last step's token comes in the chunk with finish_reason and usage, never after it
    assert 1 <= len(chunks) <= 3 and all(c.token_ids for c in chunks)
    assert [c.finish_reason for c in chunks] == [0] * (len(chunks) - 1) + [pb.LENGTH]
    assert chunks[-1].usage.completion_tokens == 3
    expected = [t for c in chunks for t in c.token_ids]
    assert len(expected) == 3
    job = wpb.Job(request_id="last-delta", text="The weather today", parameters=p)
    events = list(internal.Run(job, timeout=60))
    deltas = [t for e in events if e.HasField("delta") for t in e.delta.token_ids]
    fin = events[-1].finished
    assert fin.HasField("last_delta")
    assert deltas + list(fin.last_delta.token_ids) == expected
    # the end carries the last step's token; no message of its own for it
    assert fin.last_delta.token_ids and len(events) <= 3


def test_seeded_sampling_reproducible(inference):
    p = params(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    a = inference.Generate(pb.GenerateRequest(inputs=["Tell me a story"], parameters=p), timeout=60)
    b = inference.Generate(pb.GenerateRequest(inputs=["Other prompt", "Tell me a story", "x y z"], parameters=p),
                           timeout=60)
    assert list(a.outputs[0].token_ids) == list(b.outputs[1].token_ids)


def test_context_clamp_reports_length(internal, channel):
    info = internal.Info(wpb.InfoRequest())
    prompt = [1] + [100] * (info.max_context - 2)
    job = wpb.Job(request_id="clamp", token_ids=wpb.TokenIds(ids=prompt), parameters=params(max_new_tokens=50))
    events = list(internal.Generate(iter([wpb.WorkerRequest(job=job)]), timeout=120))
    final = events[-1].finished
    assert final.finish_reason == pb.LENGTH
    assert final.usage.completion_tokens == 1
    assert final.usage.prompt_tokens == info.max_context - 1


def test_worker_run_streams_what_generate_streams(internal):
    """Run (one job, no later messages) gives the same events as the bidirectional Generate, and the same
    INVALID_ARGUMENT naming the field for a bad job."""
    job = wpb.Job(request_id="run-a", text="Tell me a story", parameters=params(max_new_tokens=12, temperature=0.0))
    ran = list(internal.Run(job, timeout=120))
    job.request_id = "run-b"
    streamed = list(internal.Generate(iter([wpb.WorkerRequest(job=job)]), timeout=120))

    def content(events):  # how deltas split into messages depends on how fast they are read (coalescing)
        return ("".join(e.delta.text for e in events[:-1]), [t for e in events[:-1] for t in e.delta.token_ids],
                events[-1])

    assert content(ran) == content(streamed) and ran[-1].HasField("finished")
    with pytest.raises(grpc.RpcError) as err:
        list(internal.Run(wpb.Job(request_id="run-c", parameters=params()), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "job.prompt" in err.value.details()


def test_worker_generate_cancel(internal):
    requests: queue.Queue = queue.Queue()
    job = wpb.Job(request_id="to-cancel", text="Count to a thousand",
                  parameters=params(max_new_tokens=2000, ignore_eos=True))
    requests.put(wpb.WorkerRequest(job=job))

    def gen():
        while (item := requests.get()) is not None:
            yield item

    call = internal.Generate(gen(), timeout=120)
    deltas = 0
    for ev in call:
        if ev.HasField("delta"):
            deltas += 1
            if deltas == 3:
                requests.put(wpb.WorkerRequest(cancel=wpb.Cancel()))
        else:
            assert ev.finished.finish_reason == pb.CANCELLED
            assert ev.finished.usage.completion_tokens < 2000
            break
    requests.put(None)


def test_client_cancellation_frees_blocks(inference, internal):
    req = pb.GenerateRequest(inputs=["a long one"] * 3, parameters=params(max_new_tokens=3000, ignore_eos=True))
    call = inference.GenerateStream(req, timeout=120)
    for i, _ in enumerate(call):
        if i == 10:
            call.cancel()
            break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        load = internal.Load(wpb.LoadRequest())
        if load.num_running == 0 and load.num_waiting == 0 and load.num_free_blocks == load.num_total_blocks:
            break
        time.sleep(0.05)
    assert load.num_running == 0 and load.num_waiting == 0
    assert load.num_free_blocks == load.num_total_blocks


def test_chat_two_turns_reuse_history(inference):
    requests: queue.Queue = queue.Queue()

    def gen():
        while (item := requests.get()) is not None:
            yield item

    turn1 = pb.ChatTurn(messages=[pb.ChatMessage(role="system", content="Be brief."),
                                  pb.ChatMessage(role="user", content="Hi!")],
                        parameters=params(max_new_tokens=8, temperature=0.0, ignore_eos=True))
    requests.put(pb.ChatRequest(turn=turn1))
    ends, texts = [], [""]
    for ev in inference.Chat(gen(), timeout=120):
        if ev.HasField("delta"):
            texts[-1] += ev.delta.text
            continue
        ends.append(ev.end)
        if len(ends) == 2:
            break
        texts.append("")
        requests.put(pb.ChatRequest(turn=pb.ChatTurn(messages=[pb.ChatMessage(role="user", content="Again?")],
                                                     parameters=params(max_new_tokens=4, ignore_eos=True))))
    requests.put(None)
    assert ends[0].finish_reason == pb.LENGTH and ends[0].usage.completion_tokens == 8
    assert ends[1].finish_reason == pb.LENGTH and ends[1].usage.completion_tokens == 4
    # turn two's prompt is turn one's prompt + reply + </s> + the new [INST] block
    assert ends[1].usage.prompt_tokens > ends[0].usage.prompt_tokens + 8 + 1
    # ... and its KV cache is reused: every full block of turn one's prompt + reply
    block_size = 16
    assert ends[1].usage.cached_prompt_tokens >= (ends[0].usage.prompt_tokens + 8) // block_size * block_size - 16
    assert ends[1].usage.cached_prompt_tokens > 0


def test_chat_cancel_turn_keeps_session(inference):
    requests: queue.Queue = queue.Queue()

    def gen():
        while (item := requests.get()) is not None:
            yield item

    requests.put(pb.ChatRequest(turn=pb.ChatTurn(messages=[pb.ChatMessage(role="user", content="Go on forever")],
                                                 parameters=params(max_new_tokens=3000, ignore_eos=True))))
    call = inference.Chat(gen(), timeout=120)
    ends, deltas = [], 0
    for ev in call:
        if ev.HasField("delta"):
            deltas += 1
            if deltas == 3 and not ends:
                requests.put(pb.ChatRequest(cancel=pb.CancelTurn()))
            continue
        ends.append(ev.end)
        if len(ends) == 1:
            requests.put(pb.ChatRequest(turn=pb.ChatTurn(messages=[pb.ChatMessage(role="user", content="Short")],
                                                         parameters=params(max_new_tokens=3))))
        else:
            break
    requests.put(None)
    assert ends[0].finish_reason == pb.CANCELLED
    assert ends[1].finish_reason in (pb.LENGTH, pb.EOS)


def test_count_tokens_and_list_models(inference):
    text = inference.CountTokens(pb.CountTokensRequest(text="Hello world"))
    assert text.count >= 2 and text.max_context > 0
    chat = inference.CountTokens(pb.CountTokensRequest(chat=pb.ChatTurn(messages=[
        pb.ChatMessage(role="user", content="Hello world")])))
    assert chat.count > text.count  # [INST] markers
    models = inference.ListModels(pb.ListModelsRequest())
    assert len(models.models) == 1 and models.models[0].max_context == text.max_context


BAD_GENERATE = [
    (dict(inputs=[""]), "inputs[0]"),
    (dict(inputs=[]), "inputs"),
    (dict(inputs=["ok"], parameters=params(temperature=-0.5)), "parameters.temperature"),
    (dict(inputs=["ok"], parameters=params(temperature=math.nan)), "parameters.temperature"),
    (dict(inputs=["ok"], parameters=params(top_p=0.0)), "parameters.top_p"),
    (dict(inputs=["ok"], parameters=params(top_p=1.5)), "parameters.top_p"),
    (dict(inputs=["ok"], parameters=params(max_new_tokens=0)), "parameters.max_new_tokens"),
    (dict(inputs=["ok"], parameters=params(max_new_tokens=10**6)), "parameters.max_new_tokens"),
    (dict(inputs=["ok"], parameters=params(repetition_penalty=0.0)), "parameters.repetition_penalty"),
    (dict(inputs=["ok"], parameters=params(repetition_penalty=-1.0)), "parameters.repetition_penalty"),
    (dict(inputs=["ok"], parameters=params(stop=[f"s{i}" for i in range(17)])), "parameters.stop"),
    (dict(inputs=["ok", "x" * 200_000]), "inputs[1]"),
]
# top_k < 0 cannot be expressed on the wire: the field is a uint32.


def test_bad_input_gets_invalid_argument_and_disturbs_nothing(inference, internal):
    background = pb.GenerateRequest(inputs=["steady"], parameters=params(max_new_tokens=60, temperature=0.0,
                                                                          ignore_eos=True))
    expected = inference.Generate(background, timeout=60).outputs[0]
    results: list = []
    t = threading.Thread(target=lambda: results.append(inference.Generate(background, timeout=120)))
    t.start()
    for fields, name in BAD_GENERATE:
        for method in (inference.Generate, lambda r, **kw: list(inference.GenerateStream(r, **kw))):
            with pytest.raises(grpc.RpcError) as err:
                method(pb.GenerateRequest(**fields), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert name in err.value.details(), (name, err.value.details())
    t.join(120)
    assert list(results[0].outputs[0].token_ids) == list(expected.token_ids)


def test_prompt_over_context_names_both_counts(inference, internal):
    info = internal.Info(wpb.InfoRequest())
    job = wpb.Job(request_id="too-long", token_ids=wpb.TokenIds(ids=[5] * info.max_context))
    with pytest.raises(grpc.RpcError) as err:
        list(internal.Generate(iter([wpb.WorkerRequest(job=job)]), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(info.max_context) in err.value.details() and "job.token_ids" in err.value.details()


def _run_job(internal, job: wpb.Job) -> tuple[list[wpb.WorkerEvent], wpb.Finished]:
    events = list(internal.Generate(iter([wpb.WorkerRequest(job=job)]), timeout=120))
    assert events[-1].HasField("finished")
    fin = events[-1].finished
    deltas = [e for e in events if e.HasField("delta")]
    if fin.HasField("last_delta"):  # the tokens of the job's last step ride with its end
        deltas.append(wpb.WorkerEvent(delta=fin.last_delta))
    return deltas, fin


@pytest.mark.parametrize("prompt", [dict(text="Once upon a time"),
                                    dict(chat=wpb.ChatMessages(messages=[pb.ChatMessage(role="user",
                                                                                        content="Hi there")]))],
                         ids=["text", "chat"])
def test_resumed_job_continues_the_stream_exactly(internal, prompt):
    """Failover: a job carrying the tokens a client already received continues where the stream stopped."""
    p = params(max_new_tokens=20, temperature=0.8, top_p=0.95, seed=99, ignore_eos=True, stop=["xq"])
    deltas, full = _run_job(internal, wpb.Job(request_id="resume-full", parameters=p, **prompt))
    ids = [t for d in deltas for t in d.delta.token_ids]
    # resume from points a client could have reached: after 1, about a third, all but one, and all of the deltas
    # (a delta usually carries one token; more when the reader fell behind and they were coalesced)
    for cut in sorted({1, len(deltas) // 3, len(deltas) - 1, len(deltas)}):
        streamed = deltas[:cut]
        k = sum(len(d.delta.token_ids) for d in streamed)
        job = wpb.Job(request_id=f"resume-{k}", parameters=p, resume_token_ids=ids[:k], **prompt)
        rest, fin = _run_job(internal, job)
        assert "".join(d.delta.text for d in streamed + rest) == "".join(d.delta.text for d in deltas)
        assert ids[:k] + [t for d in rest for t in d.delta.token_ids] == ids
        assert fin.finish_reason == full.finish_reason
        assert fin.usage.completion_tokens == full.usage.completion_tokens
        assert fin.usage.prompt_tokens == full.usage.prompt_tokens
        assert list(fin.history_token_ids) == list(full.history_token_ids)


def test_bad_resume_tokens_get_invalid_argument(internal):
    info = internal.Info(wpb.InfoRequest())
    bad = [
        wpb.Job(request_id="resume-vocab", text="hi", resume_token_ids=[5, info.vocab_size]),
        wpb.Job(request_id="resume-long", token_ids=wpb.TokenIds(ids=[1] * 10),
                resume_token_ids=[5] * (info.max_context - 9)),
    ]
    for job in bad:
        with pytest.raises(grpc.RpcError) as err:
            list(internal.Generate(iter([wpb.WorkerRequest(job=job)]), timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "job.resume_token_ids" in err.value.details(), err.value.details()


@pytest.mark.parametrize(
    "messages, field",
    [
        ([("robot", "hi")], "messages[0].role"),
        ([("user", "hi"), ("system", "late")], "messages[1]"),
        ([("user", "x" * 200_000)], "messages[0]"),
        ([("assistant", "hi")], "messages"),
    ],
)
def test_bad_chat_turn(inference, messages, field):
    turn = pb.ChatTurn(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages])
    with pytest.raises(grpc.RpcError) as err:
        list(inference.Chat(iter([pb.ChatRequest(turn=turn)]), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details(), err.value.details()


def test_unknown_model_not_found(inference):
    with pytest.raises(grpc.RpcError) as err:
        inference.Generate(pb.GenerateRequest(model="llama-9000", inputs=["hi"]), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_logs_hold_no_user_text(inference, worker_log):
    inference.Generate(pb.GenerateRequest(inputs=[SECRET], parameters=params(max_new_tokens=4)), timeout=60)
    time.sleep(0.2)
    logs = worker_log.read_text()
    assert "request_finished" in logs
    assert SECRET not in logs and "zebra" not in logs
