"""Paged attention in plain PyTorch: write the step's k/v to the block cache, attend through it.

Decode rows gather their blocks into a padded buffer for SDPA by default; with a FlexDecode (`--decode-attention
flex`, worker.model.flex_decode) they are read in place from the pool instead. Prefill chunks always use SDPA."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.model.context import AttentionContext
from worker.model.flex_decode import FlexDecode, FlexDecodeStep

# Cost model for grouping decode sequences by context length (in units of one padded KV block read):
# every extra group costs a few kernel launches, every padded block costs memory traffic.
_GROUP_COST_IN_BLOCKS = 8


@dataclass(slots=True)
class DecodeGroup:
    """Decode sequences of similar length, attended together in one padded gather + SDPA call."""

    rows: torch.Tensor | None  # [B] flat token rows of their single queries (None: rows start..start+B)
    start: int  # first row when rows is None
    blocks: torch.Tensor  # [B * num_blocks] block ids, row-major, padded with block 0
    num_blocks: int
    mask: torch.Tensor | None  # [B, 1, 1, num_blocks * block_size] bool, False past each context


@dataclass(slots=True)
class PrefillChunk:
    """One sequence's new tokens (query_len > 1), attended with SDPA, reading its cached prefix if any."""

    start: int  # flat rows start..end
    end: int
    context_len: int
    blocks: torch.Tensor | None  # [num_blocks] its block ids when a cached prefix must be read
    mask: torch.Tensor | None  # [query_len, context_len] bool, causal with the prefix offset


@dataclass(slots=True)
class AttentionPlan:
    """Everything about a step's attention that is the same for every layer, built once per forward."""

    decode_groups: list[DecodeGroup]
    prefills: list[PrefillChunk]
    scratch: torch.Tensor | None = None  # [2, max group blocks, block_size, Hkv, D], shared by all layers
    flex: FlexDecodeStep | None = None  # reads every decode row in place (then decode_groups is empty)

    def gather_buffers(self, k_cache: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reused buffers for a group's gathered K and V blocks (fresh ones page-fault in every layer)."""
        if self.scratch is None:
            most = max(g.blocks.numel() for g in self.decode_groups)
            self.scratch = k_cache.new_empty((2, most, *k_cache.shape[1:]))
        return self.scratch[0, :num_blocks], self.scratch[1, :num_blocks]


def plan_attention(ctx: AttentionContext, flex: FlexDecode | None = None) -> AttentionPlan:
    bs = ctx.block_size
    cu = ctx.cu_query_lens.tolist()
    device = ctx.slot_mapping.device
    decodes: list[int] = []
    prefills: list[PrefillChunk] = []
    for i, (q, c) in enumerate(zip(ctx.query_lens, ctx.context_lens, strict=True)):
        if q == 1:
            decodes.append(i)
        elif q == c:
            prefills.append(PrefillChunk(cu[i], cu[i + 1], c, None, None))
        else:
            rows = torch.arange(c - q, c, device=device)
            mask = torch.arange(c, device=device)[None, :] <= rows[:, None]
            blocks = ctx.block_tables[i, : (c + bs - 1) // bs]
            prefills.append(PrefillChunk(cu[i], cu[i + 1], c, blocks, mask))
    if flex is not None and decodes:
        return AttentionPlan([], prefills, flex=flex.plan(ctx, decodes, cu))
    return AttentionPlan(_decode_groups(ctx, _group_by_length(decodes, ctx), cu), prefills)


def _group_by_length(seqs: list[int], ctx: AttentionContext) -> list[list[int]]:
    """Split decode sequences into groups padded to their longest, minimising padding + per-group cost."""
    bs = ctx.block_size
    by_blocks: dict[int, list[int]] = {}
    for i in seqs:
        by_blocks.setdefault((ctx.context_lens[i] + bs - 1) // bs, []).append(i)
    if len(by_blocks) <= 1:
        return [seqs] if seqs else []
    sizes = sorted(by_blocks)  # distinct block counts; a group is a run of them
    counts = [0]
    for n in sizes:
        counts.append(counts[-1] + len(by_blocks[n]))
    # best[j]: least cost of sizes[:j]; group sizes[i:j] costs (counts[j] - counts[i]) * sizes[j-1] + overhead
    best, cut = [0], [0]
    for j in range(1, len(sizes) + 1):
        w = sizes[j - 1]
        costs = [best[i] - counts[i] * w for i in range(j)]
        i = min(range(j), key=costs.__getitem__)
        best.append(costs[i] + counts[j] * w + _GROUP_COST_IN_BLOCKS)
        cut.append(i)
    groups = []
    j = len(sizes)
    while j > 0:
        groups.append([s for n in sizes[cut[j] : j] for s in by_blocks[n]])
        j = cut[j]
    return groups[::-1]


def _decode_groups(ctx: AttentionContext, groups: list[list[int]], cu: list[int]) -> list[DecodeGroup]:
    if not groups:
        return []
    bs = ctx.block_size
    index = torch.tensor([i for seqs in groups for i in seqs], device=ctx.block_tables.device)
    tables = ctx.block_tables.index_select(0, index)  # [B, max_blocks], rows in group order
    lens = ctx.context_lens_t.index_select(0, index)
    rows = ctx.cu_query_lens.index_select(0, index)
    span = torch.arange(tables.shape[1] * bs, device=lens.device)
    mask = span < lens[:, None]  # [B, max_blocks * block_size], True where a query may attend
    out, a = [], 0
    for seqs in groups:
        b = a + len(seqs)
        longest = max(ctx.context_lens[i] for i in seqs)
        num_blocks = (longest + bs - 1) // bs
        contiguous = seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        padded = min(ctx.context_lens[i] for i in seqs) < num_blocks * bs
        out.append(DecodeGroup(
            rows=None if contiguous else rows[a:b],
            start=cu[seqs[0]],
            blocks=tables[a:b, :num_blocks].reshape(-1),
            num_blocks=num_blocks,
            mask=mask[a:b, None, None, : num_blocks * bs] if padded else None,
        ))
        a = b
    return out


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, ctx: AttentionContext, scale: float,
                    plan: AttentionPlan | None = None) -> torch.Tensor:
    """Causal attention of every sequence's new tokens over its whole context, through the block cache."""
    # q: [T, Hq, D]; k, v: [T, Hkv, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D] -> [T, Hq, D]
    plan = plan or plan_attention(ctx)
    num_kv_heads, head_dim = k_cache.shape[2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, ctx.slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, ctx.slot_mapping, v)
    num_heads = q.shape[1]
    out = torch.empty_like(q)
    if plan.flex is not None:
        plan.flex.attend(q, k_cache, v_cache, out, scale)
    for g in plan.decode_groups:
        b = g.blocks.numel() // g.num_blocks
        q_g = q[g.start : g.start + b] if g.rows is None else q.index_select(0, g.rows)
        # [B, L, Hkv, D] gathered blocks, viewed as [B, Hkv, L, D]; query heads grouped per kv head as rows
        k_g, v_g = plan.gather_buffers(k_cache, g.blocks.numel())
        torch.index_select(k_cache, 0, g.blocks, out=k_g)
        torch.index_select(v_cache, 0, g.blocks, out=v_g)
        k_g = k_g.view(b, -1, num_kv_heads, head_dim).transpose(1, 2)
        v_g = v_g.view(b, -1, num_kv_heads, head_dim).transpose(1, 2)
        q_g = q_g.view(b, num_kv_heads, num_heads // num_kv_heads, head_dim)
        o_g = F.scaled_dot_product_attention(q_g, k_g, v_g, attn_mask=g.mask, scale=scale)
        o_g = o_g.reshape(b, num_heads, head_dim)
        if g.rows is None:
            out[g.start : g.start + b] = o_g
        else:
            out.index_copy_(0, g.rows, o_g)
    for p in plan.prefills:
        q_p = q[p.start : p.end].transpose(0, 1).unsqueeze(0)  # [1, Hq, Lq, D]
        if p.blocks is None:
            k_p, v_p = k[p.start : p.end], v[p.start : p.end]
        else:
            k_p = k_cache.index_select(0, p.blocks).view(-1, num_kv_heads, head_dim)[: p.context_len]
            v_p = v_cache.index_select(0, p.blocks).view(-1, num_kv_heads, head_dim)[: p.context_len]
        o_p = F.scaled_dot_product_attention(
            q_p, k_p.transpose(0, 1).unsqueeze(0), v_p.transpose(0, 1).unsqueeze(0),
            attn_mask=p.mask, is_causal=p.mask is None, scale=scale, enable_gqa=True,
        )
        out[p.start : p.end] = o_p[0].transpose(0, 1)
    return out

