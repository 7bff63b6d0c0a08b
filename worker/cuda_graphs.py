"""Decode steps as CUDA graphs (GPU only; the CPU path never constructs this).

A decode-only step (every scheduled sequence adds exactly one token and samples it) is replayed from a CUDA graph
captured for its (batch bucket, context bucket):

- batch buckets 1, 2, 4, 8, 16, 32, 64, 128, 256, ... up to max_num_seqs: a step of n sequences runs the graph of
  the smallest bucket B >= n. The B - n padding rows repeat the last real row (same token, position and KV slot),
  so their KV writes put the very same values in the very same slot: no scratch slot, no corruption, and the
  duplicated index_copy_ is deterministic. Their logits are dropped.
- context buckets: the number of KV blocks M every row's block table is padded to, a power of two >= MIN_BLOCKS;
  attention gathers [B, M * block_size] keys and values (the same gather + SDPA as the eager decode path in
  worker.model.attention, as one group with a length mask), so its cost follows the bucket, not the pool.
- graphs are captured lazily, on the first step that needs them (a few model runs: two warm-ups on a side stream,
  then the capture; their KV writes are this step's own, so they are idempotent), into one shared memory pool;
  buckets above max_graph_tokens (B * M * block_size, which bounds the gather scratch) and steps with anything
  else (prefill chunks, sequences that do not sample) run on the eager path.

Everything the graph reads lives in static tensors of the graph's entry; run() copies a step's plan into them and
replays. The decode forward (decode_forward) is plain PyTorch over the model's own layers and runs on any device,
which is how it is tested on CPU against the eager runner (capture=False); only capture and replay need CUDA.
Tensor parallelism (collectives inside the graph) is not supported: the runner only builds this for one rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
import torch

from worker.model.attention import AttentionPlan, DecodeGroup
from worker.model.context import AttentionContext
from worker.tp.plan import StepPlan

log = structlog.get_logger("worker.cuda_graphs")

MIN_BLOCKS = 8
DEFAULT_MAX_GRAPH_TOKENS = 128 * 1024  # B * M * block_size of the largest graph (bounds the gather scratch)


def batch_buckets(max_num_seqs: int) -> list[int]:
    out, b = [], 1
    while b < max_num_seqs:
        out.append(b)
        b *= 2
    out.append(b)
    return out


def next_pow2(n: int, least: int = 1) -> int:
    p = least
    while p < n:
        p *= 2
    return p


@dataclass
class _Graph:
    batch: int
    num_blocks: int
    input_ids: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    slots: torch.Tensor  # [B]
    tables: torch.Tensor  # [B, M]
    lens: torch.Tensor  # [B]
    logits: torch.Tensor | None = None  # [B, V] float, written by each replay
    graph: object | None = None  # torch.cuda.CUDAGraph


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], *, block_size: int,
                 device: torch.device, max_num_seqs: int, max_context: int,
                 max_graph_tokens: int = DEFAULT_MAX_GRAPH_TOKENS, capture: bool = True):
        if capture and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.buckets = batch_buckets(max_num_seqs)
        self.max_blocks = next_pow2((max_context + block_size - 1) // block_size, MIN_BLOCKS)
        self.max_graph_tokens = max_graph_tokens
        self.capture = capture
        rotary = model.model.rotary_emb
        self.inv_freq = rotary.inv_freq.to(device)  # on the device once: no host copy inside a graph
        self.rope_scaling = rotary.scaling
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.failed: set[tuple[int, int]] = set()
        self.pool = None
        self.num_replays = 0
        self.num_eager_fallbacks = 0

    # --- the step --------------------------------------------------------------------------------
    def bucket(self, plan: StepPlan) -> tuple[int, int] | None:
        """(B, M) for a decode-only plan that fits a graph, else None (the eager path runs it)."""
        n = len(plan.query_lens)
        if n == 0 or n > self.buckets[-1] or plan.num_sample_rows != n or plan.input_ids.numel() != n:
            return None
        if any(q != 1 for q in plan.query_lens):
            return None
        if not torch.equal(plan.sample_rows, torch.arange(n, dtype=plan.sample_rows.dtype)):
            return None
        b = next(x for x in self.buckets if x >= n)
        m = next_pow2((max(plan.context_lens) + self.block_size - 1) // self.block_size, MIN_BLOCKS)
        if m > self.max_blocks or b * m * self.block_size > self.max_graph_tokens:
            return None
        return b, m

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor | None:
        """Logits [n, V] (float) of a decode-only step from its graph, or None when the eager path must run it."""
        key = self.bucket(plan)
        if key is None or key in self.failed:
            self.num_eager_fallbacks += 1
            return None
        entry = self.graphs.get(key)
        fresh = entry is None
        if fresh:
            entry = self._entry(*key)
        self._fill(entry, plan)
        if not self.capture:  # the same computation, eagerly (CPU tests)
            entry.logits = self.decode_forward(entry)
            self.graphs[key] = entry
        elif fresh:
            try:
                self._capture(entry)
            except torch.OutOfMemoryError:
                raise  # the engine sheds load and retries
            except Exception:  # noqa: BLE001 - a bucket that cannot be captured runs eagerly from now on
                log.exception("cuda_graph_capture_failed", batch=key[0], num_blocks=key[1])
                self.failed.add(key)
                self.num_eager_fallbacks += 1
                return None
            self.graphs[key] = entry
            entry.graph.replay()
        else:
            entry.graph.replay()
        self.num_replays += 1
        return entry.logits[: len(plan.query_lens)].clone()

    def _entry(self, b: int, m: int) -> _Graph:
        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=self.device)

        return _Graph(b, m, z(b), z(b), z(b), z(b, m), z(b))

    def _fill(self, entry: _Graph, plan: StepPlan) -> None:
        n, b, m = len(plan.query_lens), entry.batch, entry.num_blocks
        idx = torch.cat([torch.arange(n), torch.full((b - n,), n - 1, dtype=torch.long)])  # pad with the last row
        w = min(plan.block_tables.shape[1], m)
        tables = torch.zeros((n, m), dtype=torch.long)
        tables[:, :w] = plan.block_tables[:, :w]
        entry.input_ids.copy_(plan.input_ids[idx])
        entry.positions.copy_(plan.positions[idx])
        entry.slots.copy_(plan.slot_mapping[idx])
        entry.tables.copy_(tables[idx])
        entry.lens.copy_(torch.tensor(plan.context_lens, dtype=torch.long)[idx])

    def decode_forward(self, e: _Graph) -> torch.Tensor:
        """The model's decode step over the entry's static inputs; [B, V] float logits. Graph-capturable: no host
        syncs, no host-to-device copies, shapes fixed by (B, M)."""
        inner = self.model.model
        bs = self.block_size
        span = torch.arange(e.num_blocks * bs, device=self.device)
        mask = (span[None, :] < e.lens[:, None])[:, None, None, :]  # [B, 1, 1, M * bs]
        plan = AttentionPlan([DecodeGroup(None, 0, e.tables.reshape(-1), e.num_blocks, mask)], [])
        ctx = AttentionContext(query_lens=[1] * e.batch, context_lens=[], cu_query_lens=e.lens, context_lens_t=e.lens,
                               slot_mapping=e.slots, block_tables=e.tables, block_size=bs)
        x = inner.embed_tokens(e.input_ids)
        freqs = e.positions[:, None].float() * self.inv_freq
        cos = (freqs.cos() * self.rope_scaling).to(x.dtype).unsqueeze(1)
        sin = (freqs.sin() * self.rope_scaling).to(x.dtype).unsqueeze(1)
        residual = None
        for layer, kv_cache in zip(inner.layers, self.kv_caches, strict=True):
            x, residual = layer(x, residual, cos, sin, ctx, plan, kv_cache)
        hidden = inner.norm(x, residual)[0]
        return self.model.compute_logits(hidden).float()

    def _capture(self, entry: _Graph) -> None:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # cuBLAS/SDPA workspaces and lazy inits happen outside the capture
                self.decode_forward(entry)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            entry.logits = self.decode_forward(entry)
        entry.graph = graph
        log.info("cuda_graph_captured", batch=entry.batch, num_blocks=entry.num_blocks, num_graphs=len(self.graphs) + 1)

    def stats(self) -> dict[str, int]:
        return {"graphs": len(self.graphs), "replays": self.num_replays, "eager_fallbacks": self.num_eager_fallbacks,
                "failed_buckets": len(self.failed)}
