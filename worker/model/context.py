"""Per-step attention metadata handed from the model runner to every attention layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionContext:
    """Describes one forward step over a flat batch of tokens from several sequences.

    The step's tokens are laid out sequence after sequence: sequence i owns rows
    cu_query_lens[i]:cu_query_lens[i+1] of the flat [num_tokens, ...] activations. Its new tokens are
    the last query_lens[i] of its context_lens[i] tokens, so prefix tokens already in the KV cache
    (context_lens[i] - query_lens[i] of them) are attended to but not recomputed.

    KV caches are per layer: k_cache, v_cache of shape [num_blocks, block_size, num_kv_heads, head_dim].
    Token t's key/value is written to flat slot slot_mapping[t] = block_id * block_size + offset.
    """

    query_lens: list[int]  # python ints, one per sequence
    context_lens: list[int]  # python ints, one per sequence (cached prefix + new tokens)
    cu_query_lens: torch.Tensor  # [num_seqs + 1] long
    context_lens_t: torch.Tensor  # [num_seqs] long
    slot_mapping: torch.Tensor  # [num_tokens] long
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] long, padded with 0
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)
