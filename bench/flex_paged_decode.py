"""Paged decode attention with torch's FlexAttention, read in place from the KV pool, against the worker's gather
path (index_select of each sequence's blocks into a padded buffer, then SDPA), in one run, on CPU or GPU.

    .venv/bin/python bench/flex_paged_decode.py [--seqs 8] [--context 300] [--pool-blocks 4096] [--device cpu]

The pool is one layer's [num_blocks, block_size, kv_heads, head_dim] cache; each of `--seqs` sequences owns random
blocks of it and decodes one token. FlexAttention sees the whole pool as one key/value sequence shared by the batch
and a BlockMask built straight from the block tables (BlockMask.from_kv_blocks: a sequence's full pages need no
mask, its last partial page masks positions past its length), so nothing is copied; the mask costs a few tensor ops
per step, not create_block_mask's evaluation of every (sequence, slot) pair. Printed: the largest difference from
the gather path (parity), the compile time, and ms per call of both paths. A probe towards issue 19's GPU decode
path; the worker does not use it yet.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention


def pool(args, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.pool_blocks, args.block_size, args.kv_heads, args.head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    lens = torch.randint(args.context // 2, args.context + 1, (args.seqs,), generator=gen)
    width = (args.context + args.block_size - 1) // args.block_size
    tables = torch.randperm(args.pool_blocks, generator=gen)[: args.seqs * width].view(args.seqs, width)
    q = torch.randn(args.seqs, args.heads, args.head_dim, generator=gen)
    return (k_cache.to(device), v_cache.to(device), tables.to(torch.int32).to(device), lens.to(device),
            q.to(device))


def block_mask(tables: torch.Tensor, lens: torch.Tensor, num_blocks: int, block_size: int) -> BlockMask:
    """The decode batch's BlockMask over the pool: per sequence its full pages, and its last page if partial."""
    seqs, width = tables.shape
    device = tables.device
    full = (lens // block_size).to(torch.int32)
    used = ((lens + block_size - 1) // block_size).to(torch.int32)
    full_idx = torch.zeros(seqs, 1, 1, num_blocks, dtype=torch.int32, device=device)
    full_idx[:, 0, 0, :width] = tables
    part_idx = torch.zeros(seqs, 1, 1, num_blocks, dtype=torch.int32, device=device)
    last = tables.gather(1, full.clamp(max=width - 1).long()[:, None])[:, 0]
    part_idx[:, 0, 0, 0] = last
    # each slot's position in its sequence: a shared (prefix-cached) page sits at the same position in every
    # sequence that holds it, so one tensor serves them all
    pos = torch.zeros(num_blocks * block_size, dtype=torch.int32, device=device)
    page_start = torch.arange(width, device=device, dtype=torch.int32)[None, :].expand(seqs, width) * block_size
    slots = tables.long()[:, :, None] * block_size + torch.arange(block_size, device=device)[None, None, :]
    pos[slots.reshape(-1)] = (page_start[:, :, None] + torch.arange(block_size, device=device,
                                                                    dtype=torch.int32)).reshape(-1)

    def mask_mod(b, h, q_idx, kv_idx):
        return pos[kv_idx] < lens[b]

    return BlockMask.from_kv_blocks((used - full).view(seqs, 1, 1), part_idx, full.view(seqs, 1, 1), full_idx,
                                    BLOCK_SIZE=(1, block_size), mask_mod=mask_mod,
                                    seq_lengths=(1, num_blocks * block_size))


def gather_decode(q, k_cache, v_cache, tables, lens, scale) -> torch.Tensor:
    """The worker's path: each sequence's blocks gathered into a padded buffer, SDPA with a length mask."""
    seqs, width = tables.shape
    bs, kv_heads, head_dim = k_cache.shape[1:]
    k = k_cache.index_select(0, tables.reshape(-1).long()).view(seqs, width * bs, kv_heads, head_dim).transpose(1, 2)
    v = v_cache.index_select(0, tables.reshape(-1).long()).view(seqs, width * bs, kv_heads, head_dim).transpose(1, 2)
    mask = (torch.arange(width * bs, device=q.device)[None, :] < lens[:, None])[:, None, None, :]
    heads = q.shape[1]
    q = q.view(seqs, kv_heads, heads // kv_heads, head_dim)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).reshape(seqs, heads, head_dim)


def timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--pool-blocks", type=int, default=4096)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    k_cache, v_cache, tables, lens, q = pool(args, device)
    scale = args.head_dim ** -0.5
    n, bs = args.pool_blocks, args.block_size
    keys = k_cache.view(1, n * bs, args.kv_heads, args.head_dim).transpose(1, 2).expand(args.seqs, -1, -1, -1)
    values = v_cache.view(1, n * bs, args.kv_heads, args.head_dim).transpose(1, 2).expand(args.seqs, -1, -1, -1)
    flex = torch.compile(flex_attention, dynamic=False)

    def flex_decode():
        mask = block_mask(tables, lens, n, bs)
        return flex(q[:, :, None, :], keys, values, block_mask=mask, enable_gqa=True, scale=scale)[:, :, 0]

    t0 = time.perf_counter()
    out = flex_decode()
    compile_s = time.perf_counter() - t0
    ref = gather_decode(q, k_cache, v_cache, tables, lens, scale)
    diff = (out - ref).abs().max().item()
    mask_ms = timed(lambda: block_mask(tables, lens, n, bs), args.rounds)
    flex_ms = timed(flex_decode, args.rounds)
    gather_ms = timed(lambda: gather_decode(q, k_cache, v_cache, tables, lens, scale), args.rounds)
    print(f"{args.seqs} sequences of {args.context // 2}-{args.context} tokens, {n} pool blocks of {bs} "
          f"({args.heads}/{args.kv_heads} heads, head dim {args.head_dim}), {device}")
    print(f"  parity: max |flex - gather| = {diff:.2e}")
    print(f"  flex:   {flex_ms:.3f} ms per call (of which the block mask {mask_ms:.3f} ms); "
          f"compiled in {compile_s:.1f} s")
    print(f"  gather: {gather_ms:.3f} ms per call")
    print(f"flex / gather: {flex_ms / gather_ms:.2f}x")
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
