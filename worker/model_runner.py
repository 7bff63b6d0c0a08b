"""Turns a scheduled batch into tensors, runs the model on the paged KV cache, and samples."""

from __future__ import annotations

import torch

from worker.model.context import AttentionContext
from worker.sampler import sample
from worker.scheduler import ScheduledBatch


class ModelRunner:
    """Owns the model and the KV cache tensors; called only from the engine thread."""

    def __init__(self, model, *, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 num_layers: int, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = device
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv_caches)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> dict[str, int]:
        """Compute every scheduled chunk; return the sampled next token of each sampling sequence."""
        input_ids, positions, ctx, sample_rows = self._prepare(batch)
        hidden = self.model(input_ids, positions, ctx, self.kv_caches)
        sampling = [e.seq for e in batch.entries if e.is_sampling]
        if not sampling:
            return {}
        logits = self.model.compute_logits(hidden[sample_rows]).float()
        token_ids = sample(
            logits,
            [s.params for s in sampling],
            [s.token_ids for s in sampling],
            [s.num_output_tokens for s in sampling],
        )
        return {s.request_id: t for s, t in zip(sampling, token_ids, strict=True)}

    def _prepare(self, batch: ScheduledBatch):
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        sample_rows: list[int] = []
        max_blocks = 0
        for e in batch.entries:
            seq, start, n = e.seq, e.start, e.num_new_tokens
            end = start + n
            table = seq.block_table
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(n)
            context_lens.append(end)
            if e.is_sampling:
                sample_rows.append(len(input_ids) - 1)
            max_blocks = max(max_blocks, (end + bs - 1) // bs)
        block_tables = torch.zeros((len(batch.entries), max_blocks), dtype=torch.long)
        for i, e in enumerate(batch.entries):
            needed = (context_lens[i] + bs - 1) // bs
            block_tables[i, :needed] = torch.tensor(e.seq.block_table[:needed], dtype=torch.long)
        cu = [0]
        for q in query_lens:
            cu.append(cu[-1] + q)
        dev = self.device
        ctx = AttentionContext(
            query_lens=query_lens,
            context_lens=context_lens,
            cu_query_lens=torch.tensor(cu, dtype=torch.long, device=dev),
            context_lens_t=torch.tensor(context_lens, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=block_tables.to(dev),
            block_size=bs,
        )
        return (
            torch.tensor(input_ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            ctx,
            torch.tensor(sample_rows, dtype=torch.long, device=dev),
        )
