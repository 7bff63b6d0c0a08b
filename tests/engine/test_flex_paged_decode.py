"""worker.model.flex_decode's FlexAttention decode over the KV pool in place (a BlockMask built from the block
tables) equals the gather path on one layer, through paged_attention itself, as bench/flex_paged_decode.py runs
it: contexts ending inside a page and on a page boundary, a batch padded up to its bucket."""

from __future__ import annotations

import argparse

import torch

from bench.flex_paged_decode import decode_step
from worker.model.attention import paged_attention, plan_attention
from worker.model.flex_decode import FlexDecode, batch_bucket


def test_flex_decode_over_the_pool_matches_the_gather_path():
    args = argparse.Namespace(seqs=5, context=90, pool_blocks=64, block_size=16, heads=4, kv_heads=2, head_dim=16,
                              seed=3)
    ctx, q, k, v, k_cache, v_cache = decode_step(args, torch.device("cpu"))
    ctx.context_lens[0] = 32  # (a context that ends on a page boundary: no partial page)
    ctx.context_lens_t[0] = 32
    ctx.slot_mapping[0] = ctx.block_tables[0, 1] * 16 + 15
    scale = args.head_dim ** -0.5
    flex = FlexDecode(args.pool_blocks, args.block_size, args.seqs, torch.device("cpu"))
    plan = plan_attention(ctx, flex)
    assert plan.decode_groups == [] and plan.flex.padded == batch_bucket(5) == 8
    caches = k_cache.clone(), v_cache.clone()
    got = paged_attention(q, k, v, *caches, ctx, scale, plan)
    want = paged_attention(q, k, v, k_cache, v_cache, ctx, scale, plan_attention(ctx))
    assert (got - want).abs().max().item() < 1e-5
    assert torch.equal(caches[0], k_cache) and torch.equal(caches[1], v_cache)  # the same new keys written


def test_batch_buckets():
    assert [batch_bucket(n) for n in (1, 8, 9, 16, 17, 100, 256)] == [8, 8, 16, 16, 32, 128, 256]
