"""bench/flex_paged_decode.py's FlexAttention decode over the KV pool in place (a BlockMask built from the block
tables) equals the worker's gather path: the probe towards the GPU decode kernel stays correct."""

from __future__ import annotations

import argparse

import torch
from torch.nn.attention.flex_attention import flex_attention

from bench.flex_paged_decode import block_mask, gather_decode, pool


def test_flex_decode_over_the_pool_matches_the_gather_path():
    args = argparse.Namespace(seqs=5, context=90, pool_blocks=64, block_size=16, heads=4, kv_heads=2, head_dim=16,
                              seed=3)
    k_cache, v_cache, tables, lens, q = pool(args, torch.device("cpu"))
    lens[0] = 32  # (a context that ends on a page boundary: no partial page)
    scale = args.head_dim ** -0.5
    n, bs = args.pool_blocks, args.block_size
    keys = k_cache.view(1, n * bs, args.kv_heads, args.head_dim).transpose(1, 2).expand(args.seqs, -1, -1, -1)
    values = v_cache.view(1, n * bs, args.kv_heads, args.head_dim).transpose(1, 2).expand(args.seqs, -1, -1, -1)
    out = torch.compile(flex_attention, dynamic=False)(q[:, :, None, :], keys, values,
                                                       block_mask=block_mask(tables, lens, n, bs), enable_gqa=True,
                                                       scale=scale)[:, :, 0]
    assert (out - gather_decode(q, k_cache, v_cache, tables, lens, scale)).abs().max().item() < 1e-5
