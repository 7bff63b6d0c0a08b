"""`python -m worker.tp.rank_main --rank R ...`: a tensor-parallel rank > 0, spawned by rank 0 (worker.tp.group).

It loads its slices of the checkpoint, allocates its KV shard and runs rank 0's step plans until told to
stop. It has no server, scheduler or sampler. Its WorkerConfig arrives pickled on stdin.
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import sys

import structlog
import torch

from common.logs import configure_logging
from worker.config import WorkerConfig
from worker.devices import resolve_device, resolve_dtype
from worker.faults import OOM_EXIT_CODE, FaultPlan
from worker.heartbeat import Heartbeat
from worker.kv_sizing import plan_kv_cache
from worker.model.loader import load_hf_config, load_model
from worker.model_runner import ModelRunner
from worker.tp.group import RANK_LOST_EXIT_CODE, agree_num_blocks, die_with_parent, join_group, rank_device
from worker.tp.plan import PlanChannel, PlanKind

log = structlog.get_logger("worker.tp.rank")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.tp.rank_main")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--store", required=True, help="host:port of rank 0's rendezvous store")
    p.add_argument("--parent-pid", type=int, required=True)
    args = p.parse_args(argv)
    die_with_parent(args.parent_pid)
    for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 alone decides: a STOP plan, or its death
        signal.signal(sig, signal.SIG_IGN)
    config: WorkerConfig = pickle.loads(sys.stdin.buffer.read())
    configure_logging(config.log_level, component="worker", tp_rank=args.rank)
    heartbeat = Heartbeat(config.run_dir, args.rank) if config.run_dir else None
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    runner, plans = _join_and_load(config, args.rank, args.world_size, args.store)
    code = _follow_plans(plans, runner, heartbeat, FaultPlan.parse(config.inject_fault), args.rank, args.parent_pid)
    if code == 0:
        torch.distributed.destroy_process_group()
        log.info("tp_rank_stopped")
    return code


def _join_and_load(config: WorkerConfig, rank: int, world_size: int, store: str) -> tuple[ModelRunner, PlanChannel]:
    """Join rank 0's group, load this rank's shard and allocate its KV shard (the pool size every rank agrees on)."""
    device = rank_device(resolve_device(config.device), rank)
    dtype = resolve_dtype(config.dtype, device)
    tp, plans = join_group(rank, world_size, store, device)
    hf_config = load_hf_config(config.model_dir)
    model = load_model(config.model_dir, dtype=dtype, device=device, tp=tp)
    layout = plan_kv_cache(config, hf_config, dtype, device)
    num_blocks = agree_num_blocks(layout.num_blocks, device)
    runner = ModelRunner(model, num_blocks=num_blocks, block_size=layout.block_size, dtype=dtype, device=device,
                         tp=tp, max_num_seqs=config.max_num_seqs, decode_attention=config.decode_attention)
    log.info("tp_rank_ready", kv_blocks=num_blocks, kv_pool_bytes=runner.kv_cache_bytes, device=str(device))
    return runner, plans


def _follow_plans(plans: PlanChannel, runner: ModelRunner, heartbeat: Heartbeat | None, faults: FaultPlan,
                  rank: int, parent_pid: int) -> int:
    """Run rank 0's plans until a STOP plan (0) or until the group breaks (the exit code to end with)."""
    num_steps = 0
    try:
        while True:
            kind, plan = plans.recv()
            if heartbeat is not None:
                heartbeat.beat()
            if kind == PlanKind.STOP:
                return 0
            if kind == PlanKind.STEP:
                faults.check(num_steps, rank=rank)
                num_steps += 1
                runner.execute(plan)
            elif os.getppid() != parent_pid:  # belt and braces beside PR_SET_PDEATHSIG
                log.error("tp_rank_orphaned")
                return RANK_LOST_EXIT_CODE
    except torch.OutOfMemoryError:  # the group cannot shed load around one rank: restart it
        log.error("tp_rank_oom", step=num_steps)
        return OOM_EXIT_CODE
    except Exception as e:  # noqa: BLE001 - a broken group (rank 0 gone): exit non-zero, quietly
        log.error("tp_rank_failed", error=type(e).__name__)
        return RANK_LOST_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
