"""The worker's one configuration object, built from the command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from common.internal_auth import INTERNAL_TOKEN_ENV, read_internal_token
from worker import faults

DTYPES = ("float32", "bfloat16", "float16", "auto")
DECODE_ATTENTION = ("gather", "flex")


class ConfigRefused(ValueError):
    """A configuration found unusable only once the model is known (e.g. `--tp` that does not divide its heads):
    `python -m worker` prints it as `error: ...` and exits 2, like a bad flag."""


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    model_dir: Path
    model_name: str = ""  # served name; empty = the checkpoint directory's name
    host: str = "127.0.0.1"
    port: int = 50061  # 0 = any free port
    metrics_port: int | None = None  # Prometheus /metrics on host:metrics_port; None = off, 0 = any free port
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on GPU
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # token budget of one engine step
    kv_cache_tokens: int | None = None  # KV pool size in tokens; None = from kv_memory_fraction
    kv_memory_fraction: float = 0.25  # of free device memory (CPU: of available RAM) for the KV pool
    enable_prefix_caching: bool = True
    default_max_new_tokens: int = 256
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_message_chars: int = 100_000
    num_threads: int | None = None  # torch intra-op threads on CPU; None = torch's default
    drain_timeout_s: float = 30.0
    log_level: str = "info"
    internal_token: str | None = field(default=None, repr=False)  # secret: calls must carry it (common.internal_auth)
    tp_size: int = 1  # tensor-parallel ranks in this replica; rank 0 (this process) spawns the others
    run_dir: Path | None = None  # each rank keeps its heartbeat file rank{r}.heartbeat here (worker.heartbeat)
    cuda_graphs: bool = False  # decode steps as CUDA graphs (one GPU rank only; worker.cuda_graphs)
    decode_attention: str = "gather"  # gather: padded copy + SDPA; flex: in place (worker.model.flex_decode)
    inject_fault: str | None = None  # tests only: worker.faults spec; refused unless LLAMAGRID_ALLOW_FAULT_INJECTION=1

    def __post_init__(self) -> None:
        if not self.model_dir:
            raise ValueError("model_dir is required")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be positive")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be at least block_size")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ValueError("kv_cache_tokens must hold at least one block")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError("kv_memory_fraction must be in (0, 1]")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be in 0..65535")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError("metrics_port must be in 0..65535")
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be at least 1, got {self.tp_size}")
        if self.decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"decode_attention must be one of {DECODE_ATTENTION}, got {self.decode_attention!r}")
        if self.decode_attention == "flex" and self.cuda_graphs:
            raise ValueError("decode_attention 'flex' cannot be combined with cuda_graphs: the graphs capture the "
                             "gather path")
        faults.require_allowed(self.inject_fault)

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.model_dir).resolve().name


def build_parser() -> argparse.ArgumentParser:
    d = WorkerConfig.__dataclass_fields__
    p = argparse.ArgumentParser(prog="python -m worker", description="Serve one Llama-2 replica over gRPC.")
    p.add_argument("--model", required=True, type=Path, help="Hugging Face checkpoint directory")
    p.add_argument("--model-name", default="", help="served model name (default: the directory name)")
    p.add_argument("--host", default=d["host"].default)
    p.add_argument("--port", type=int, default=d["port"].default, help="0 picks a free port")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics here (0 picks a free port, written to <port-file>.metrics)")
    p.add_argument("--device", default=d["device"].default)
    p.add_argument("--dtype", default=d["dtype"].default, choices=DTYPES)
    p.add_argument("--block-size", type=int, default=d["block_size"].default)
    p.add_argument("--max-num-seqs", type=int, default=d["max_num_seqs"].default)
    p.add_argument("--max-num-batched-tokens", type=int, default=d["max_num_batched_tokens"].default)
    p.add_argument("--kv-cache-tokens", type=int, default=None)
    p.add_argument("--kv-memory-fraction", type=float, default=d["kv_memory_fraction"].default)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--default-max-new-tokens", type=int, default=d["default_max_new_tokens"].default)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--port-file", type=Path, default=None, help="write the bound port here once serving")
    p.add_argument("--log-level", default="info")
    p.add_argument("--internal-token-file", type=Path, default=None,
                   help=f"require this token from callers (default ${INTERNAL_TOKEN_ENV}; neither = no token)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (one GPU each; gloo on CPU)")
    p.add_argument("--run-dir", type=Path, default=None, help="write per-rank heartbeat files here")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay decode steps from CUDA graphs (CUDA device, --tp 1; ignored otherwise)")
    p.add_argument("--decode-attention", default=d["decode_attention"].default, choices=DECODE_ATTENTION,
                   help="decode rows: gather each sequence's KV blocks for SDPA, or read them in place with "
                        "FlexAttention (compiled per batch bucket; slower on CPU)")
    p.add_argument("--inject-fault", default=None, metavar="SPEC",
                   help=f"tests only: e.g. oom@step=40,times=3 (needs {faults.ALLOW_ENV}=1; see worker/faults.py)")
    return p


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(
        model_dir=args.model,
        model_name=args.model_name,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_tokens=args.kv_cache_tokens,
        kv_memory_fraction=args.kv_memory_fraction,
        enable_prefix_caching=not args.no_prefix_caching,
        default_max_new_tokens=args.default_max_new_tokens,
        num_threads=args.num_threads,
        log_level=args.log_level,
        internal_token=read_internal_token(args.internal_token_file),
        inject_fault=args.inject_fault,
        tp_size=args.tp,
        run_dir=args.run_dir,
        cuda_graphs=args.cuda_graphs,
        decode_attention=args.decode_attention,
    )
