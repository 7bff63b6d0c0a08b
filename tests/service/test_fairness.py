"""Tenants at a real worker: one tenant's flood of long jobs does not hold every running slot against another's job."""

from __future__ import annotations

import threading

import grpc
import pytest

from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from tests.support.waits import wait_until
from worker.launch import start_worker

MAX_NUM_SEQS = 4
NUM_FLOOD = 3 * MAX_NUM_SEQS
FLOOD_TOKENS = 128  # long enough that the first flood jobs are still running when the newcomer's token comes
DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def worker_stub(tiny_model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("fairness-log") / "worker.stderr"
    with open(log_path, "wb") as log:
        proc = start_worker(tiny_model_dir, "--max-num-seqs", str(MAX_NUM_SEQS), "--kv-cache-tokens", "8192",
                            "--num-threads", "2", stderr=log)
    try:
        with grpc.insecure_channel(proc.address) as channel:
            yield wpb_grpc.WorkerStub(channel)
    finally:
        proc.stop()


def job(request_id: str, tenant: str, max_new_tokens: int) -> wpb.Job:
    return wpb.Job(request_id=request_id, text="Once upon a time", tenant=tenant,
                   parameters=pb.SamplingParameters(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True))


def test_a_tenant_gets_a_slot_while_another_floods_the_worker(worker_stub):
    lock = threading.Lock()
    flood_results: dict[str, wpb.Finished] = {}
    errors: list[BaseException] = []

    def flood(i: int) -> None:
        try:
            events = list(worker_stub.Run(job(f"flood-{i}", "flood", FLOOD_TOKENS), timeout=DEADLINE_S))
            with lock:
                flood_results[f"flood-{i}"] = events[-1].finished
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(NUM_FLOOD)]
    for t in threads:
        t.start()

    def flood_holds_every_slot() -> bool:
        load = worker_stub.Load(wpb.LoadRequest())
        return load.num_running == MAX_NUM_SEQS and load.num_waiting == NUM_FLOOD - MAX_NUM_SEQS

    wait_until(flood_holds_every_slot, "the flood to fill every slot and queue the rest", DEADLINE_S)

    num_flood_done_at_first_token = None
    tokens = []
    for event in worker_stub.Run(job("interactive-0", "interactive", 4), timeout=DEADLINE_S):
        delta = event.delta if event.HasField("delta") else event.finished.last_delta
        if delta.token_ids and num_flood_done_at_first_token is None:
            with lock:
                num_flood_done_at_first_token = len(flood_results)
        tokens += delta.token_ids
    assert len(tokens) == 4
    # first in, first served would have made it wait for all NUM_FLOOD flood jobs; a fair share of the
    # slots gets it in while the first flood jobs are still generating
    assert num_flood_done_at_first_token == 0

    for t in threads:
        t.join(DEADLINE_S)
    assert not errors, errors
    assert len(flood_results) == NUM_FLOOD  # the preempted flood job was recomputed and finished too
    for finished in flood_results.values():
        assert finished.finish_reason == pb.LENGTH and finished.usage.completion_tokens == FLOOD_TOKENS


def test_an_overlong_tenant_is_refused(worker_stub):
    with pytest.raises(grpc.RpcError) as err:
        list(worker_stub.Run(job("tenant-too-long", "t" * 129, 4), timeout=DEADLINE_S))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "job.tenant" in err.value.details()
