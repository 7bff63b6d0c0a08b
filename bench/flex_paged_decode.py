"""Decode attention of the worker both ways in one run, on CPU or GPU: FlexAttention reading the KV pool in place
(`--decode-attention flex`, worker.model.flex_decode) against the gather path (each sequence's blocks copied into
a padded buffer, then SDPA; worker.model.attention), through worker.model.attention.paged_attention itself.

    .venv/bin/python bench/flex_paged_decode.py [--seqs 8] [--context 300] [--pool-blocks 4096] [--device cpu]

The pool is one layer's [num_blocks, block_size, kv_heads, head_dim] cache; each of `--seqs` sequences owns random
blocks of it (contexts of context/2..context tokens) and decodes one token. Printed: the largest difference
between the paths (parity), the first call's compile time, and ms per call of each: the step's plan (built once
per forward, shared by every layer) and one layer's attention.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.model.attention import paged_attention, plan_attention  # noqa: E402
from worker.model.context import AttentionContext  # noqa: E402
from worker.model.flex_decode import FlexDecode  # noqa: E402


def decode_step(args, device) -> tuple[AttentionContext, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor]:
    """A decode-only step over a random pool: its context, q/k/v of the new tokens and the two caches."""
    gen = torch.Generator().manual_seed(args.seed)
    bs = args.block_size
    shape = (args.pool_blocks, bs, args.kv_heads, args.head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    lens = torch.randint(args.context // 2, args.context + 1, (args.seqs,), generator=gen)
    width = (args.context + bs - 1) // bs
    tables = torch.randperm(args.pool_blocks, generator=gen)[: args.seqs * width].view(args.seqs, width)
    last = lens - 1
    slots = tables.gather(1, (last // bs)[:, None])[:, 0] * bs + last % bs
    ctx = AttentionContext(
        query_lens=[1] * args.seqs, context_lens=lens.tolist(), cu_query_lens=torch.arange(args.seqs + 1).to(device),
        context_lens_t=lens.to(device), slot_mapping=slots.to(device), block_tables=tables.to(device), block_size=bs,
    )
    q = torch.randn(args.seqs, args.heads, args.head_dim, generator=gen)
    k = torch.randn(args.seqs, args.kv_heads, args.head_dim, generator=gen)
    v = torch.randn(args.seqs, args.kv_heads, args.head_dim, generator=gen)
    return ctx, q.to(device), k.to(device), v.to(device), k_cache.to(device), v_cache.to(device)


def timed(fn, rounds: int, device: torch.device) -> float:
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
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
    ctx, q, k, v, k_cache, v_cache = decode_step(args, device)
    scale = args.head_dim ** -0.5
    flex = FlexDecode(args.pool_blocks, args.block_size, args.seqs, device)

    def flex_plan():
        return plan_attention(ctx, flex)

    def flex_layer(plan):
        return paged_attention(q, k, v, k_cache, v_cache, ctx, scale, plan)

    t0 = time.perf_counter()
    out = flex_layer(flex_plan())
    compile_s = time.perf_counter() - t0
    ref = paged_attention(q, k, v, k_cache, v_cache, ctx, scale, plan_attention(ctx))
    diff = (out - ref).abs().max().item()
    plan = flex_plan()
    flex_plan_ms = timed(flex_plan, args.rounds, device)
    flex_ms = timed(lambda: flex_layer(plan), args.rounds, device)
    gather_plan_ms = timed(lambda: plan_attention(ctx), args.rounds, device)
    gplan = plan_attention(ctx)
    gather_ms = timed(lambda: paged_attention(q, k, v, k_cache, v_cache, ctx, scale, gplan), args.rounds, device)
    print(f"{args.seqs} sequences of {args.context // 2}-{args.context} tokens, {args.pool_blocks} pool blocks of "
          f"{args.block_size} ({args.heads}/{args.kv_heads} heads, head dim {args.head_dim}), {device}")
    print(f"  parity: max |flex - gather| = {diff:.2e}")
    print(f"  flex:   {flex_ms:.3f} ms per layer, plan {flex_plan_ms:.3f} ms per step; first call (compile) "
          f"{compile_s:.1f} s")
    print(f"  gather: {gather_ms:.3f} ms per layer, plan {gather_plan_ms:.3f} ms per step")
    print(f"flex / gather per layer: {flex_ms / gather_ms:.2f}x")
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
