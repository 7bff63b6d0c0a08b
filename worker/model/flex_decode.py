"""Decode attention read in place from the paged KV pool with torch's FlexAttention (`--decode-attention flex`).

The gather path (worker.model.attention) copies each decoding sequence's blocks into a padded buffer before SDPA:
at batch 128 and long contexts that copy moves a large fraction of the weight bytes again every step. Here the
whole pool of one layer is a single key/value sequence shared by the batch, and a BlockMask built from the block
tables tells the kernel which pages each sequence reads, so nothing is copied:

- a page of the pool is one kv block of the mask (KV_BLOCK_SIZE = block_size; CUDA's kernel shrinks its tile to
  fit), a sequence's one decode query is its only query block;
- a sequence's full pages need no mask at all; its last page, if partial, masks the offsets at or past its length
  (`kv_idx % block_size < rem[b]`), which is the only per-element work;
- the index tensors are persistent buffers as wide as the pool (the kernel requires the mask to span the whole key
  sequence) of which a step writes only the first pages of each row: the kernel reads no entry past a row's count.

Shapes are static per batch bucket (8, 16, 32, ... sequences, padding rows read nothing), so torch.compile
compiles once per bucket and never per step; the mask's tensors change every step, its shapes do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from worker.model.context import AttentionContext

MIN_BUCKET = 8  # the smallest padded batch: on a CPU every bucket costs a few seconds of compilation
# One query block spans the single decode query; CUDA's decoding kernel needs its tile (at least 16 rows: query
# heads sharing a kv head) to divide the mask's query block, as the default 128 does.
Q_BLOCK = 128


def batch_bucket(n: int) -> int:
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return b


@dataclass(slots=True)
class FlexDecodeStep:
    """One forward's decode rows and their BlockMask, shared by every layer."""

    rows: torch.Tensor | None  # [B] flat token rows of the single queries (None: rows start..start+B)
    start: int
    batch: int  # B real sequences
    padded: int  # the bucket the kernel runs at
    block_mask: BlockMask
    kernel: object  # FlexDecode's compiled flex_attention

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
               scale: float) -> None:
        # q: [T, Hq, D] (all of the step's rows); k_cache, v_cache: [num_blocks, block_size, Hkv, D]; writes out's
        # decode rows
        num_kv_heads, head_dim = k_cache.shape[2:]
        b, padded = self.batch, self.padded
        q_d = q[self.start : self.start + b] if self.rows is None else q.index_select(0, self.rows)
        if padded > b:
            q_d = torch.cat((q_d, q_d.new_zeros((padded - b, *q_d.shape[1:]))))
        keys = k_cache.view(1, -1, num_kv_heads, head_dim).transpose(1, 2).expand(padded, -1, -1, -1)
        values = v_cache.view(1, -1, num_kv_heads, head_dim).transpose(1, 2).expand(padded, -1, -1, -1)
        o = self.kernel(q_d[:, :, None, :], keys, values, block_mask=self.block_mask, scale=scale,
                        enable_gqa=True)[:b, :, 0]
        if self.rows is None:
            out[self.start : self.start + b] = o
        else:
            out.index_copy_(0, self.rows, o)


class FlexDecode:
    """Builds each step's BlockMask over the pool (FlexDecodeStep, which every layer runs the compiled kernel with)."""

    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        most = batch_bucket(max_num_seqs)
        # page ids per (sequence, 1 head, 1 query block, page); only the first count entries of a row are read
        self._full = torch.zeros(most, 1, 1, num_blocks, dtype=torch.int32, device=device)
        # a partial page is at most one per sequence: one column, seen by the mask as wide as the pool
        self._partial = torch.zeros(most, 1, 1, 1, dtype=torch.int32, device=device)
        self._kernel = torch.compile(flex_attention, dynamic=False)

    def plan(self, ctx: AttentionContext, decodes: list[int], cu: list[int]) -> FlexDecodeStep:
        bs = self.block_size
        b = len(decodes)
        padded = batch_bucket(b)
        contiguous = decodes == list(range(decodes[0], decodes[0] + b))
        index = torch.tensor(decodes, device=ctx.block_tables.device)
        tables = ctx.block_tables.index_select(0, index)  # [B, W]
        lens = ctx.context_lens_t.index_select(0, index)
        width = tables.shape[1]
        full = lens // bs
        counts = torch.zeros(2, padded, dtype=torch.int32, device=lens.device)  # [full pages, partial pages]
        counts[0, :b] = full
        rem = torch.zeros(padded, dtype=torch.int32, device=lens.device)  # tokens on the partial page
        rem[:b] = lens % bs
        counts[1] = rem != 0
        self._full[:b, 0, 0, :width] = tables
        self._partial[:b, 0, 0, 0] = tables.gather(1, full.clamp(max=width - 1)[:, None])[:, 0]

        def partial_page(b, h, q_idx, kv_idx):
            return kv_idx % bs < rem[b]

        mask = BlockMask.from_kv_blocks(
            counts[1].view(padded, 1, 1), self._partial[:padded].expand(-1, -1, -1, self.num_blocks),
            counts[0].view(padded, 1, 1), self._full[:padded],
            BLOCK_SIZE=(Q_BLOCK, bs), mask_mod=partial_page, seq_lengths=(1, self.num_blocks * bs),
            compute_q_blocks=False,
        )
        rows = None if contiguous else ctx.cu_query_lens.index_select(0, index)
        return FlexDecodeStep(rows, cu[decodes[0]], b, padded, mask, self._kernel)
