"""A real `python -m worker --tp 2` replica (two gloo ranks on the CPU): token parity with TP=1 and with
transformers, what happens when a rank is killed, refusals at start, and per-rank heartbeat files."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from tests.engine.test_parity import hf_greedy, random_prompts
from tests.support.waits import wait_until
from worker.faults import ALLOW_ENV
from worker.heartbeat import read_heartbeats
from worker.launch import WorkerProcess, start_worker
from worker.tp.group import RANK_LOST_EXIT_CODE

MAX_NEW_TOKENS = 16
WORKER_ARGS = ("--num-threads", "1", "--kv-cache-tokens", "4096", "--max-num-batched-tokens", "256")


def start_tp_worker(model_dir: Path, run_dir: Path, *args: str, env: dict[str, str] | None = None) -> WorkerProcess:
    return start_worker(model_dir, "--tp", "2", "--run-dir", str(run_dir), *WORKER_ARGS, *args, env=env,
                        timeout=300)


@pytest.fixture(scope="module")
def tp_worker(tiny_gqa_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tp-run")
    worker = start_tp_worker(tiny_gqa_model_dir, run_dir)
    yield worker, run_dir
    assert worker.stop() == 0


def generate(address: str, prompts: list[list[int]], max_new_tokens: int = MAX_NEW_TOKENS) -> list[list[int]]:
    """Greedy tokens of every prompt, all submitted at once (so they batch) over Worker.Generate."""
    params = pb.SamplingParameters(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    with grpc.insecure_channel(address) as channel:
        stub = wpb_grpc.WorkerStub(channel)

        def one(i: int) -> list[int]:
            job = wpb.Job(request_id=f"p{i}", token_ids=wpb.TokenIds(ids=prompts[i]), parameters=params)
            ids: list[int] = []
            for event in stub.Generate(iter([wpb.WorkerRequest(job=job)]), timeout=300):
                ids += event.delta.token_ids if event.HasField("delta") else event.finished.last_delta.token_ids
            return ids

        with ThreadPoolExecutor(len(prompts)) as pool:
            return list(pool.map(one, range(len(prompts))))


def wait_for(predicate, what: str, timeout: float = 30.0):
    return wait_until(predicate, what, timeout)


def rank_pids(run_dir: Path, size: int = 2, timeout: float = 30.0) -> dict[int, int]:
    def all_ranks():
        beats = read_heartbeats(run_dir)
        return beats if len(beats) == size else None

    beats = wait_for(all_ranks, f"the heartbeat files of {size} ranks", timeout)
    return {rank: pid for rank, (pid, _) in beats.items()}


def is_gone(pid: int) -> bool:
    """True when pid no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def wait_gone(pid: int, timeout: float) -> None:
    wait_for(lambda: is_gone(pid), f"pid {pid} to end", timeout)


def test_info_reports_tp_size(tp_worker):
    worker, _ = tp_worker
    with grpc.insecure_channel(worker.address) as channel:
        info = wpb_grpc.WorkerStub(channel).Info(wpb.InfoRequest(), timeout=30)
    assert info.tp_size == 2


def test_tp2_greedy_equals_tp1_and_transformers(tp_worker, tiny_gqa_model_dir, tmp_path):
    worker, _ = tp_worker
    prompts = random_prompts(1024, seed=3)[::2]  # 8 prompts of 1..280 tokens: prefill chunks and decodes
    got = generate(worker.address, prompts)
    single = start_worker(tiny_gqa_model_dir, *WORKER_ARGS, timeout=300)
    try:
        expected_tp1 = generate(single.address, prompts)
    finally:
        single.stop()
    assert got == expected_tp1
    assert got == hf_greedy(tiny_gqa_model_dir, prompts, MAX_NEW_TOKENS)


def test_tp2_flex_decode_equals_transformers(tiny_gqa_model_dir, tmp_path):
    """Each rank reads its own heads' pages in place (`--decode-attention flex`): the same greedy tokens."""
    prompts = random_prompts(1024, seed=4)[1::2]
    worker = start_tp_worker(tiny_gqa_model_dir, tmp_path, "--decode-attention", "flex")
    try:
        got = generate(worker.address, prompts)
    finally:
        assert worker.stop() == 0
    assert got == hf_greedy(tiny_gqa_model_dir, prompts, MAX_NEW_TOKENS)


def test_heartbeats_of_both_ranks_keep_moving_while_idle(tp_worker):
    worker, run_dir = tp_worker
    pids = rank_pids(run_dir)
    assert pids[0] == worker.proc.pid
    assert int(Path(f"/proc/{pids[1]}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pids[0]  # ppid
    before = read_heartbeats(run_dir)

    def both_moved():
        beats = read_heartbeats(run_dir)
        return beats if all(beats[rank][1] > before[rank][1] for rank in (0, 1)) else None

    # idle, each rank beats every few tenths of a second (rank 0's ticker, rank 1 on each IDLE plan)
    after = wait_for(both_moved, "both ranks' heartbeats to move while idle", timeout=10)
    now = time.time()
    for rank in (0, 1):
        assert now - after[rank][1] < 2.0, f"rank {rank} heartbeat is stale"


def test_killing_rank1_ends_rank0_promptly(tiny_gqa_model_dir, tmp_path):
    worker = start_tp_worker(tiny_gqa_model_dir, tmp_path)
    pids = rank_pids(tmp_path)
    os.kill(pids[1], signal.SIGKILL)
    try:
        code = worker.proc.wait(30)
    finally:
        worker.proc.kill()
    assert code == RANK_LOST_EXIT_CODE
    wait_gone(pids[1], 5)


def test_killing_rank0_ends_rank1(tiny_gqa_model_dir, tmp_path):
    worker = start_tp_worker(tiny_gqa_model_dir, tmp_path)
    pids = rank_pids(tmp_path)
    os.kill(pids[0], signal.SIGKILL)
    worker.proc.wait(30)
    wait_gone(pids[1], 30)


def test_hung_engine_stops_rank0_heartbeat_while_rank1_keeps_beating(tiny_gqa_model_dir, tmp_path):
    # the engine thread blocks for good at its 5th step (warm-up takes the first two)
    worker = start_tp_worker(tiny_gqa_model_dir, tmp_path, "--inject-fault", "hang@step=4", env={ALLOW_ENV: "1"})
    pids = rank_pids(tmp_path)
    try:
        client = threading.Thread(target=_generate_ignoring_errors, args=(worker.address,), daemon=True)
        client.start()
        wait_for(lambda: time.time() - read_heartbeats(tmp_path)[0][1] >= 3.0, "rank 0's heartbeat to go stale "
                 "with a hung engine", timeout=60)
        assert time.time() - read_heartbeats(tmp_path)[1][1] < 1.5, "rank 1 stopped receiving idle plans"
    finally:
        worker.proc.kill()
        worker.proc.wait()
    wait_gone(pids[1], 30)


def _generate_ignoring_errors(address: str) -> None:
    with contextlib.suppress(grpc.RpcError):
        generate(address, [[1, 5, 6, 7]], max_new_tokens=32)


def test_tp_that_does_not_divide_the_kv_heads_is_refused(tiny_gqa_model_dir, tmp_path):
    # 4 query heads but 2 key/value heads (tests/unit/test_heartbeat.py checks the other messages)
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "--model", str(tiny_gqa_model_dir), "--port", "0", "--tp", "4",
         "--run-dir", str(tmp_path), *WORKER_ARGS],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "error: --tp 4 cannot shard this model: its key/value heads (2) is not divisible by 4" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert set(read_heartbeats(tmp_path)) <= {0}  # refused before any other rank started
