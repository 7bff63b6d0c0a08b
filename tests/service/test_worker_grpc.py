"""The worker over real gRPC (llamagrid.worker.v1.Worker): jobs, streaming, chat sessions, cancellation, health,
bad input.

What the router's public API adds on top (several inputs per request, the Chat session stream, public field names)
is tested through a router: tests/service/test_router.py, test_isolation.py, test_router_load.py.
"""

from __future__ import annotations

import math
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from tests.support.waits import wait_until

SECRET = "zebra quartz marmalade"  # must never appear in the worker's logs
_ids = iter(range(1_000_000))


def params(**kw) -> pb.SamplingParameters:
    return pb.SamplingParameters(**kw)


def new_id(prefix: str) -> str:
    """A request id no other job of this session uses (the worker refuses two in flight with one id)."""
    return f"{prefix}-{next(_ids)}"


def chat(*messages: tuple[str, str]) -> wpb.ChatMessages:
    return wpb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages])


def wait_for(predicate, what: str, timeout_s: float = 10.0):
    return wait_until(predicate, what, timeout_s)


class Ran:
    """One job's events as the caller sees them: its deltas, the tokens that rode with its end, its Finished."""

    def __init__(self, events: list[wpb.WorkerEvent]):
        assert events and events[-1].HasField("finished") and all(e.HasField("delta") for e in events[:-1])
        self.events = events
        self.finished = events[-1].finished
        self.deltas = [e.delta for e in events[:-1]]
        if self.finished.HasField("last_delta"):
            self.deltas.append(self.finished.last_delta)

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def token_ids(self) -> list[int]:
        return [t for d in self.deltas for t in d.token_ids]


def run(internal, timeout: float = 120, **job) -> Ran:
    """Worker.Run of one job (request_id defaults to a fresh one)."""
    job.setdefault("request_id", new_id("run"))
    return Ran(list(internal.Run(wpb.Job(**job), timeout=timeout)))


def generate(internal, timeout: float = 120, **job) -> Ran:
    """The same job over the bidirectional Worker.Generate."""
    job.setdefault("request_id", new_id("gen"))
    return Ran(list(internal.Generate(iter([wpb.WorkerRequest(job=wpb.Job(**job))]), timeout=timeout)))


def run_together(internal, jobs: list[dict]) -> list[Ran]:
    """Every job at once (so they batch), each over its own Worker.Run call."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: run(internal, **job), jobs))


def test_health_serving(channel):
    resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    worker = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(
        service="llamagrid.worker.v1.Worker"))
    assert worker.status == health_pb2.HealthCheckResponse.SERVING


def test_the_public_api_is_not_served(channel):
    """The router is the only public entry: a worker answers llamagrid.v1.Inference with UNIMPLEMENTED."""
    call = channel.unary_unary("/llamagrid.v1.Inference/ListModels",
                               request_serializer=pb.ListModelsRequest.SerializeToString,
                               response_deserializer=pb.ListModelsResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        call(pb.ListModelsRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    health = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="llamagrid.v1.Inference"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_jobs_at_once_each_run_to_length(internal):
    p = params(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    results = run_together(internal, [dict(text=t, parameters=p) for t in ("Hello there", SECRET, "é ü 中文 🙂")])
    for r in results:
        assert r.finished.finish_reason == pb.LENGTH
        assert r.finished.usage.completion_tokens == 12 == len(r.token_ids)
        assert r.finished.usage.prompt_tokens > 1


def test_generate_streams_what_run_streams_for_jobs_batched_together(internal):
    p = params(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    texts = ["The weather today", "Once upon a time"]
    ran = run_together(internal, [dict(text=t, parameters=p) for t in texts])
    with ThreadPoolExecutor(2) as pool:
        streamed = list(pool.map(lambda t: generate(internal, text=t, parameters=p), texts))
    for a, b in zip(ran, streamed, strict=True):
        assert a.text == b.text and a.token_ids == b.token_ids
        assert b.finished.finish_reason == pb.LENGTH and b.finished.usage.completion_tokens == 16


def test_a_jobs_last_tokens_ride_with_its_end(internal):
    """Tokens produced in the step that ends a job come in the message that ends it (one message less):
    Finished.last_delta."""
    p = params(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    ran = run(internal, text="The weather today", parameters=p)
    # one token per step; steps a slow reader has not taken yet are merged into one delta (so up to 3 messages),
    # and the last step's token comes in the Finished message, never after it
    assert 1 <= len(ran.events) <= 3 and all(e.delta.token_ids for e in ran.events[:-1])
    assert ran.finished.finish_reason == pb.LENGTH and ran.finished.usage.completion_tokens == 3
    assert ran.finished.HasField("last_delta") and ran.finished.last_delta.token_ids
    assert len(ran.token_ids) == 3
    assert generate(internal, text="The weather today", parameters=p).token_ids == ran.token_ids


def test_seeded_sampling_reproducible(internal):
    p = params(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = run(internal, text="Tell me a story", parameters=p)
    batched = run_together(internal, [dict(text=t, parameters=p) for t in ("Other prompt", "Tell me a story",
                                                                            "x y z")])
    assert batched[1].token_ids == alone.token_ids


def test_context_clamp_reports_length(internal):
    info = internal.Info(wpb.InfoRequest())
    prompt = [1] + [100] * (info.max_context - 2)
    ran = generate(internal, token_ids=wpb.TokenIds(ids=prompt), parameters=params(max_new_tokens=50))
    assert ran.finished.finish_reason == pb.LENGTH
    assert ran.finished.usage.completion_tokens == 1
    assert ran.finished.usage.prompt_tokens == info.max_context - 1


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


def _idle(internal) -> wpb.LoadResponse | None:
    load = internal.Load(wpb.LoadRequest())
    idle = load.num_running == 0 and load.num_waiting == 0 and load.num_free_blocks == load.num_total_blocks
    return load if idle else None


def test_client_cancellation_frees_blocks(internal):
    p = params(max_new_tokens=3000, ignore_eos=True)
    calls = [internal.Run(wpb.Job(request_id=new_id("cancel"), text="a long one", parameters=p), timeout=120)
             for _ in range(3)]
    for i, _ in enumerate(calls[0]):
        if i == 10:
            break
    for call in calls:
        call.cancel()
    load = wait_for(lambda: _idle(internal), "every cancelled job's blocks to be free")
    assert load.num_running == 0 and load.num_waiting == 0
    assert load.num_free_blocks == load.num_total_blocks


def test_chat_turns_reuse_history(internal):
    """A session's second turn: the first turn's prompt, reply and </s> (Finished.history_token_ids) then the new
    [INST] block, with every full block of turn one's prompt and reply served from the prefix cache."""
    turn1 = run(internal, chat=chat(("system", "Be brief."), ("user", "Hi!")),
                parameters=params(max_new_tokens=8, temperature=0.0, ignore_eos=True))
    history = list(turn1.finished.history_token_ids)
    turn2 = run(internal, chat=chat(("user", "Again?")), history_token_ids=history,
                parameters=params(max_new_tokens=4, ignore_eos=True))
    ends = [turn1.finished, turn2.finished]
    assert ends[0].finish_reason == pb.LENGTH and ends[0].usage.completion_tokens == 8
    assert ends[1].finish_reason == pb.LENGTH and ends[1].usage.completion_tokens == 4
    assert len(history) == ends[0].usage.prompt_tokens + 8 + 1
    # turn two's prompt is turn one's prompt + reply + </s> + the new [INST] block
    assert ends[1].usage.prompt_tokens > ends[0].usage.prompt_tokens + 8 + 1
    # ... and its KV cache is reused: every full block of turn one's prompt + reply
    block_size = 16
    assert ends[1].usage.cached_prompt_tokens >= (ends[0].usage.prompt_tokens + 8) // block_size * block_size - 16
    assert ends[1].usage.cached_prompt_tokens > 0


def test_a_cancelled_chat_turn_still_gives_the_history_to_go_on_with(internal):
    requests: queue.Queue = queue.Queue()

    def gen():
        while (item := requests.get()) is not None:
            yield item

    job = wpb.Job(request_id=new_id("chat-cancel"), chat=chat(("user", "Go on forever")),
                  parameters=params(max_new_tokens=3000, ignore_eos=True))
    requests.put(wpb.WorkerRequest(job=job))
    deltas, first = 0, None
    for ev in internal.Generate(gen(), timeout=120):
        if ev.HasField("delta"):
            deltas += 1
            if deltas == 3:
                requests.put(wpb.WorkerRequest(cancel=wpb.Cancel()))
        else:
            first = ev.finished
    requests.put(None)
    assert first.finish_reason == pb.CANCELLED
    assert len(first.history_token_ids) == first.usage.prompt_tokens + first.usage.completion_tokens + 1
    second = run(internal, chat=chat(("user", "Short")), history_token_ids=first.history_token_ids,
                 parameters=params(max_new_tokens=3))
    assert second.finished.finish_reason in (pb.LENGTH, pb.EOS)


def test_count_tokens_and_info(internal):
    text = internal.CountTokens(pb.CountTokensRequest(text="Hello world"))
    assert text.count >= 2 and text.max_context > 0
    chat_count = internal.CountTokens(pb.CountTokensRequest(chat=pb.ChatTurn(messages=[
        pb.ChatMessage(role="user", content="Hello world")])))
    assert chat_count.count > text.count  # [INST] markers
    info = internal.Info(wpb.InfoRequest())
    assert info.model and info.max_context == text.max_context


BAD_JOBS = [
    (dict(text=""), "job.text"),
    (dict(text="ok", parameters=params(temperature=-0.5)), "job.parameters.temperature"),
    (dict(text="ok", parameters=params(temperature=math.nan)), "job.parameters.temperature"),
    (dict(text="ok", parameters=params(top_p=0.0)), "job.parameters.top_p"),
    (dict(text="ok", parameters=params(top_p=1.5)), "job.parameters.top_p"),
    (dict(text="ok", parameters=params(max_new_tokens=0)), "job.parameters.max_new_tokens"),
    (dict(text="ok", parameters=params(max_new_tokens=10**6)), "job.parameters.max_new_tokens"),
    (dict(text="ok", parameters=params(repetition_penalty=0.0)), "job.parameters.repetition_penalty"),
    (dict(text="ok", parameters=params(repetition_penalty=-1.0)), "job.parameters.repetition_penalty"),
    (dict(text="ok", parameters=params(stop=[f"s{i}" for i in range(17)])), "job.parameters.stop"),
    (dict(text="ok", parameters=params(presence_penalty=2.5)), "job.parameters.presence_penalty"),
    (dict(text="ok", parameters=params(frequency_penalty=-3.0)), "job.parameters.frequency_penalty"),
    (dict(text="ok", parameters=params(frequency_penalty=math.inf)), "job.parameters.frequency_penalty"),
    (dict(text="ok", parameters=params(max_new_tokens=4, min_new_tokens=5)), "job.parameters.min_new_tokens"),
    (dict(text="x" * 200_000), "job.text"),
    (dict(text="ok", request_id=""), "job.request_id"),
]
# top_k < 0 cannot be expressed on the wire: the field is a uint32.


def test_bad_input_gets_invalid_argument_and_disturbs_nothing(internal):
    background = dict(text="steady", parameters=params(max_new_tokens=60, temperature=0.0, ignore_eos=True))
    expected = run(internal, **background)
    results: list[Ran] = []
    t = threading.Thread(target=lambda: results.append(run(internal, **background)))
    t.start()
    for fields, name in BAD_JOBS:
        for method in (run, generate):
            with pytest.raises(grpc.RpcError) as err:
                method(internal, timeout=30, **{"request_id": new_id("bad"), **fields})
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert name in err.value.details(), (name, err.value.details())
    t.join(120)
    assert results[0].token_ids == expected.token_ids


def test_prompt_over_context_names_both_counts(internal):
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
        ([("robot", "hi")], "job.chat.messages[0].role"),
        ([("user", "hi"), ("system", "late")], "job.chat.messages[1]"),
        ([("user", "x" * 200_000)], "job.chat.messages[0]"),
        ([("assistant", "hi")], "job.chat.messages"),
    ],
)
def test_bad_chat_job(internal, messages, field):
    with pytest.raises(grpc.RpcError) as err:
        run(internal, timeout=30, chat=chat(*messages))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details(), err.value.details()


def test_unknown_model_not_found(internal):
    with pytest.raises(grpc.RpcError) as err:
        run(internal, timeout=30, model="llama-9000", text="hi")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_logs_hold_no_user_text(internal, worker_log):
    request_id = new_id("secret")
    run(internal, request_id=request_id, text=SECRET, parameters=params(max_new_tokens=4))

    def finished_logged() -> str | None:
        text = worker_log.read_text()
        return text if any(request_id in line and "request_finished" in line for line in text.splitlines()) else None

    logs = wait_for(finished_logged, "the job's request_finished line")
    assert SECRET not in logs and "zebra" not in logs
