"""One replica's tensor-parallel process group: rank 0 spawns ranks 1..N-1, watches them, and all join."""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import os
import pickle
import signal
import subprocess
import sys
import threading

import structlog
import torch
import torch.distributed as dist

from worker.config import ConfigRefused
from worker.faults import OOM_EXIT_CODE
from worker.model.dims import ModelDims
from worker.model.parallel import TPInfo
from worker.tp.plan import PlanChannel

log = structlog.get_logger("worker.tp")

RANK_LOST_EXIT_CODE = 3  # rank 0 exits with this when another rank died or a collective failed
MASTER_ADDR = "127.0.0.1"  # one host: each rank owns one local GPU (or shares the CPU)
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)  # covers uneven checkpoint loading; deaths fail fast
_WATCH_INTERVAL_S = 0.1
_PR_SET_PDEATHSIG = 1


def check_tp_config(hf_config, tp_size: int, device: torch.device) -> None:
    """Refuse, before anything starts, a tensor-parallel size the model or the machine cannot take."""
    if tp_size == 1:
        return
    whole = ModelDims.from_config(hf_config)
    dims = {
        "attention heads": whole.num_heads,
        "key/value heads": whole.num_kv_heads,
        "vocabulary size": hf_config.vocab_size,
        "intermediate size": hf_config.intermediate_size,
    }
    bad = [f"{what} ({n})" for what, n in dims.items() if n % tp_size]
    if bad:
        raise ConfigRefused(f"--tp {tp_size} cannot shard this model: its {', '.join(bad)} "
                         f"{'is' if len(bad) == 1 else 'are'} not divisible by {tp_size}; choose a "
                         f"tensor-parallel size that divides {', '.join(f'{w} ({n})' for w, n in dims.items())}")
    if device.type == "cuda":
        if device.index not in (None, 0):
            raise ConfigRefused(f"--tp {tp_size} places rank r on cuda:r; pass --device cuda, not {device}")
        if tp_size > torch.cuda.device_count():
            raise ConfigRefused(f"--tp {tp_size} needs {tp_size} GPUs (one per rank), "
                             f"this machine has {torch.cuda.device_count()}")


def rank_device(device: torch.device, rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


def _init(store, rank: int, size: int, device: torch.device) -> PlanChannel:
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)
    # plans travel over a gloo group on the CPU: no shared memory, so nothing on the host carries a fixed name
    return PlanChannel(None if backend == "gloo" else dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT))


class RankGroup:
    """Rank 0's side: a rendezvous store on a free port, the child ranks, the group, and a watchdog that
    takes the whole process down (RANK_LOST_EXIT_CODE) as soon as a child rank dies unasked."""

    def __init__(self, config, device: torch.device):
        self.size = config.tp_size
        self.device = rank_device(device, 0)
        # port 0: the kernel picks a free port per replica, so a restarted group never meets the old one
        self.store = dist.TCPStore(MASTER_ADDR, 0, world_size=self.size, is_master=True,
                                   timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)
        self._closing = threading.Event()
        self.procs: list[subprocess.Popen] = []
        child_config = pickle.dumps(dataclasses.replace(config, internal_token=None))
        # NOTE: PR_SET_PDEATHSIG fires when the spawning *thread* exits: spawn from a long-lived thread
        for rank in range(1, self.size):
            self.procs.append(self._spawn(rank, child_config))
        self._watchdog = threading.Thread(target=self._watch, name="tp-watchdog", daemon=True)
        self._watchdog.start()
        self.plans = _init(self.store, 0, self.size, self.device)
        self.tp = TPInfo(0, self.size)
        log.info("tp_group_ready", tp_size=self.size, store_port=self.store.port,
                 rank_pids=[p.pid for p in self.procs])

    def _spawn(self, rank: int, child_config: bytes) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "worker.tp.rank_main", "--rank", str(rank), "--world-size", str(self.size),
               "--store", f"{MASTER_ADDR}:{self.store.port}", "--parent-pid", str(os.getpid())]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
        proc.stdin.write(child_config)
        proc.stdin.close()
        return proc

    def agree_num_blocks(self, num_blocks: int) -> int:
        """The KV pool every rank can hold: the minimum over ranks (called once by every rank)."""
        return agree_num_blocks(num_blocks, self.device)

    def abort(self, reason: str, error: BaseException | None = None) -> None:
        """The group cannot continue (a rank died, a collective or a step failed): kill every rank, exit now
        with OOM_EXIT_CODE when rank 0 ran out of memory mid-step, else RANK_LOST_EXIT_CODE."""
        is_oom = isinstance(error, torch.OutOfMemoryError)
        log.error("tp_group_lost", reason=reason, error=type(error).__name__ if error else None)
        self._kill_children()
        sys.stderr.flush()
        os._exit(OOM_EXIT_CODE if is_oom else RANK_LOST_EXIT_CODE)

    def close(self, timeout: float = 10.0) -> None:
        """After the runner sent STOP: wait for the ranks to exit (kill stragglers) and leave the group."""
        self._closing.set()
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if dist.is_initialized():
            dist.destroy_process_group()

    def _watch(self) -> None:
        # a rank exits 0 only after the STOP plan (shutdown, which races with close() setting _closing)
        while not self._closing.wait(_WATCH_INTERVAL_S):
            for rank, proc in enumerate(self.procs, 1):
                code = proc.poll()
                if code not in (None, 0) and not self._closing.is_set():
                    self.abort(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {code}")

    def _kill_children(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()


def agree_num_blocks(num_blocks: int, device: torch.device) -> int:
    t = torch.tensor([num_blocks], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def join_group(rank: int, size: int, store_addr: str, device: torch.device) -> tuple[TPInfo, PlanChannel]:
    """Ranks > 0: connect to rank 0's store and join the group."""
    host, port = store_addr.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), world_size=size, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    return TPInfo(rank, size), _init(store, rank, size, device)


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent (rank 0) dies; exit now if it already has (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(RANK_LOST_EXIT_CODE)
