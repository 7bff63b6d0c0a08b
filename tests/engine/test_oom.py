"""Out of memory in a model step: the engine sheds load and retries; repeated OOM exits for a restart.

Faults are injected with worker.faults (the real path: torch.OutOfMemoryError raised just before the model runs).
"""

from __future__ import annotations

import threading

import grpc
import pytest

from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from tests.engine_utils import make_worker, run_all
from tests.support.waits import wait_until
from worker import engine as engine_module
from worker import faults
from worker.__main__ import main as worker_main
from worker.faults import OOM_EXIT_CODE, FaultPlan
from worker.launch import start_worker
from worker.sequence import SamplingParams


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    w = make_worker(tiny_model_dir, kv_cache_tokens=4096, block_size=16, max_num_batched_tokens=256,
                    max_num_seqs=16)
    yield w
    w.engine.stop()


def wait_idle(worker, timeout: float = 60.0) -> None:
    wait_until(lambda: not worker.engine.scheduler.has_unfinished and worker.engine.load.num_running == 0,
               "the engine to go idle", timeout)


def mixed_load(worker, num: int = 12, max_new_tokens: int = 24):
    prompts = [worker.tokenizer.encode_prompt(f"Request number {i} asks about the weather") for i in range(num)]
    params = [SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True) if i % 2 else
              SamplingParams(max_new_tokens=max_new_tokens, temperature=0.9, top_p=0.95, seed=i, ignore_eos=True)
              for i in range(num)]
    return prompts, params


def test_single_oom_is_absorbed_with_identical_outputs(worker):
    engine, scheduler = worker.engine, worker.engine.scheduler
    prompts, params = mixed_load(worker)
    baseline = run_all(worker, prompts, params, prefix="base")
    wait_idle(worker)
    limits = scheduler.config
    num_preemptions = scheduler.num_preemptions
    engine.faults = FaultPlan.parse(f"oom@step={engine.step_index + 3}")  # a few decode steps into the load
    shed = run_all(worker, prompts, params, prefix="oom")
    engine.faults = faults.NO_FAULTS
    assert engine.num_oom_steps == 1
    assert scheduler.num_preemptions > num_preemptions, "the newest sequences were preempted"
    for a, b in zip(baseline, shed, strict=True):
        assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason
    assert scheduler.limits.max_num_seqs < limits.max_num_seqs, "limits stay lowered for a while"
    assert scheduler.config == limits  # what was configured stays as it was
    wait_idle(worker)
    bm = scheduler.block_manager
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_blocks
    # enough good steps later the limits are back where they were
    run_all(worker, prompts[:2], SamplingParams(max_new_tokens=2 * engine_module.OOM_RECOVERY_STEPS + 4,
                                                ignore_eos=True), prefix="recover")
    assert scheduler.limits == limits


def test_repeated_oom_exits_in_process(worker, monkeypatch):
    """OOM_MAX_CONSECUTIVE OOM steps in a row call the exit hook (replaced here; the process test is below)."""
    exits = threading.Event()
    monkeypatch.setattr(engine_module, "exit_for_oom", exits.set)
    engine = worker.engine
    engine.faults = FaultPlan.parse(f"oom@step={engine.step_index + 1},times={engine_module.OOM_MAX_CONSECUTIVE}")
    try:
        prompts, params = mixed_load(worker, num=4, max_new_tokens=8)
        run_all(worker, prompts, params, prefix="repeat")  # the replaced hook returns, so the load completes
    finally:
        engine.faults = faults.NO_FAULTS
    assert exits.is_set()


def test_repeated_oom_exits_the_process_with_its_code(tiny_model_dir, tmp_path):
    log_path = tmp_path / "worker.stderr"
    with open(log_path, "wb") as log:
        # warm-up takes the first two steps; the request's steps hit the fault
        proc = start_worker(tiny_model_dir, "--kv-cache-tokens", "2048", "--num-threads", "1",
                            "--inject-fault", "oom@step=5,times=100",
                            env={faults.ALLOW_ENV: "1"}, stderr=log)
    try:
        job = wpb.Job(request_id="oom", text="Tell me a story",
                      parameters=pb.SamplingParameters(max_new_tokens=50, ignore_eos=True))
        with grpc.insecure_channel(proc.address) as channel:
            stub = wpb_grpc.WorkerStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(iter([wpb.WorkerRequest(job=job)]), timeout=120))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert proc.proc.wait(120) == OOM_EXIT_CODE
    finally:
        proc.stop()
    text = log_path.read_text()
    assert "fault_injection_active" in text
    assert text.count("engine_oom_shed") == engine_module.OOM_MAX_CONSECUTIVE - 1
    assert "engine_oom_exit" in text
    assert "Tell me a story" not in text


def test_inject_fault_is_refused_without_the_environment_switch(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.delenv(faults.ALLOW_ENV, raising=False)
    assert worker_main(["--model", str(tiny_model_dir), "--inject-fault", "oom@step=1"]) == 2
    assert faults.ALLOW_ENV in capsys.readouterr().err
    monkeypatch.setenv(faults.ALLOW_ENV, "1")
    assert worker_main(["--model", str(tiny_model_dir), "--inject-fault", "oom@soon"]) == 2
    assert "step=N" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["", "oom", "oom@", "oom@step=x", "boom@step=1", "oom@step=1,times=0",
                                  "oom@step=1,step=2", "oom@times=2", "oom@step=1,speed=2"])
def test_bad_fault_specs(spec):
    if not spec:
        assert not FaultPlan.parse(spec)
        return
    with pytest.raises(ValueError):
        FaultPlan.parse(spec)


def test_fault_plan_fires_when_due_on_its_rank(monkeypatch):
    plan = FaultPlan.parse("oom@step=3,times=2; crash@step=10,rank=1 ;hang@step=20,rank=2")
    assert [(f.kind, f.step, f.times, f.rank) for f in plan.faults] == [
        ("oom", 3, 2, 0), ("crash", 10, 1, 1), ("hang", 20, 1, 2)]
    plan.check(2, rank=0)
    plan.check(3, rank=1)  # another rank
    fired = []
    for step in range(3, 7):
        try:
            plan.check(step, rank=0)
        except Exception as e:  # noqa: BLE001
            fired.append((step, type(e).__name__))
    assert fired == [(3, "OutOfMemoryError"), (4, "OutOfMemoryError")]
    codes = []
    monkeypatch.setattr(faults, "_flush_and_exit", codes.append)
    plan.check(9, rank=1)
    plan.check(12, rank=1)
    plan.check(13, rank=1)
    assert codes == [faults.CRASH_EXIT_CODE]
    hung = threading.Thread(target=plan.check, args=(25, 2), daemon=True)
    hung.start()
    hung.join(0.3)
    assert hung.is_alive(), "a hang fault blocks its thread"
    FaultPlan().check(0, rank=0)  # no plan: a no-op
