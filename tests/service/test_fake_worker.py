"""The fake worker keeps the Worker contract the router tests rely on: what a resumed job streams, what Finished
carries, how a Cancel, a hung job, a deadline and the internal token behave, and what it records."""

from __future__ import annotations

import queue

import grpc
import pytest

from common.internal_auth import token_metadata
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from tests.support.fake_model import EOS, Fault, Script, encode_chat, encode_text, reply
from tests.support.fake_process import FakeWorkerProcess

GREEDY = pb.SamplingParameters(max_new_tokens=6, temperature=0.0)


def _ids(events) -> list[int]:
    return [t for e in events for t in (e.delta if e.HasField("delta") else e.finished.last_delta).token_ids]


def test_a_resumed_job_continues_the_uninterrupted_sequence(fakes):
    fake = fakes.start()
    with grpc.insecure_channel(fake.address) as ch:
        stub = wpb_grpc.WorkerStub(ch)
        whole = list(stub.Run(wpb.Job(request_id="r/0", text="the cat sat", parameters=GREEDY), timeout=10))
        assert _ids(whole) == reply(encode_text("the cat sat"), GREEDY, 6)
        assert whole[-1].finished.last_delta.token_ids  # the last step's token rides in Finished
        fin = whole[-1].finished
        assert (fin.finish_reason, fin.usage.prompt_tokens, fin.usage.completion_tokens) == (pb.LENGTH, 4, 6)
        rest = list(stub.Run(wpb.Job(request_id="r/1", text="the cat sat", parameters=GREEDY,
                                     resume_token_ids=_ids(whole)[:2]), timeout=10))
        assert _ids(whole)[:2] + _ids(rest) == _ids(whole) and rest[-1].finished.usage.completion_tokens == 6
        done = list(stub.Run(wpb.Job(request_id="r/2", text="the cat sat", parameters=GREEDY,
                                     resume_token_ids=_ids(whole)), timeout=10))
        assert _ids(done) == [] and done[-1].finished.finish_reason == pb.LENGTH  # nothing left to generate
    assert fake.job("r/1").resume_token_ids == _ids(whole)[:2]


@pytest.mark.parametrize("eos_after", [None, 3])
def test_chat_history_is_closed_by_one_eos(fakes, eos_after):
    fake = fakes.start(Script(eos_after=eos_after))
    job = wpb.Job(request_id="c/0", parameters=pb.SamplingParameters(max_new_tokens=5))
    job.chat.messages.add(role="user", content="hello there")
    with grpc.insecure_channel(fake.address) as ch:
        fin = list(wpb_grpc.WorkerStub(ch).Run(job, timeout=10))[-1].finished
    prompt = encode_chat(job.chat.messages)
    generated = reply(prompt, job.parameters, 3 if eos_after else 5, fake.script)
    assert fin.finish_reason == (pb.EOS if eos_after else pb.LENGTH)
    assert list(fin.history_token_ids) == prompt + generated + ([] if eos_after else [EOS])


def test_cancel_hang_deadline_and_scripted_failures_are_recorded(fakes):
    fake = fakes.start(Script(token_delay_s=0.01))
    long = pb.SamplingParameters(max_new_tokens=1000, temperature=0.0)
    with grpc.insecure_channel(fake.address) as ch:
        stub = wpb_grpc.WorkerStub(ch)
        requests: queue.Queue = queue.Queue()
        requests.put(wpb.WorkerRequest(job=wpb.Job(request_id="g/0", text="go", parameters=long)))
        events = stub.Generate(iter(requests.get, None), timeout=10)
        assert next(events).HasField("delta")
        requests.put(wpb.WorkerRequest(cancel=wpb.Cancel()))
        assert [e for e in events][-1].finished.finish_reason == pb.CANCELLED
        requests.put(None)
        fake.add_fault(Fault(kind="hang", after_tokens=2, times=1))
        hung = stub.Run(wpb.Job(request_id="h/0", text="go", parameters=long), timeout=10)
        assert len([next(hung), next(hung)]) == 2
        hung.cancel()
        fake.wait_for(lambda f: f.job("h/0").ended, "the hung job to end with its call")
        past = list(stub.Run(wpb.Job(request_id="d/0", text="go", parameters=long, deadline_unix_ms=1), timeout=10))
        assert past[-1].finished.finish_reason == pb.CANCELLED
        fake.add_fault(Fault(kind="fail", after_tokens=3, code="INTERNAL", match="f/"))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Run(wpb.Job(request_id="f/0", text="go", parameters=long), timeout=10))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Run(wpb.Job(request_id="bad", text="go", parameters=pb.SamplingParameters(top_p=2)), timeout=10))
        assert err.value.details() == "job.parameters.top_p: must be in (0, 1]"
    assert [(j.request_id, j.outcome) for j in fake.jobs] == [
        ("g/0", "cancelled"), ("h/0", "call_cancelled"), ("d/0", "deadline"), ("f/0", "failed"), ("bad", "refused")]
    assert fake.job("g/0").cancel_received and len(fake.job("f/0").sent_token_ids) == 3
    fake.wait_idle()


def test_internal_token_slow_acceptance_and_a_killed_process(fakes, tmp_path):
    fake = fakes.start(Script(accept_delay_s=0.5), internal_token="t" * 16)
    with grpc.insecure_channel(fake.address) as ch:
        stub = wpb_grpc.WorkerStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Info(wpb.InfoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and fake.refused[-1].endswith("/Info")
        call = stub.Run(wpb.Job(request_id="w/0", text="go", parameters=GREEDY), timeout=10,
                        metadata=token_metadata("t" * 16))
        fake.wait_for(lambda f: f.load().num_waiting == 1, "the job to wait to be accepted")
        assert _ids(list(call)) == reply(encode_text("go"), GREEDY, 6)
    process = FakeWorkerProcess(tmp_path / "fake.stderr")
    with grpc.insecure_channel(process.address) as ch:
        assert list(wpb_grpc.WorkerStub(ch).Run(wpb.Job(request_id="p/0", text="go", parameters=GREEDY), timeout=10))
    assert [e["outcome"] for e in process.events("job_ended")] == ["finished"]
    process.kill()
    assert process.proc.returncode == -9
