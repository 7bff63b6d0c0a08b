"""The identity of a prefix-cache block, shared by the worker (which caches blocks under it) and the router (which
predicts where a prompt's blocks are cached): one definition, so a match means the same tokens.

A block's hash chains every token before it: hash(block i) = sha256(hash(block i-1) + its token ids as int64).
A cryptographic digest, not hash(): a collision would make the worker serve another prompt's KV. Outside the
worker (events, the router's index) a block goes by `block_key`, the digest's first 8 bytes as an unsigned int:
there a collision can only misjudge where a prompt is cached, never change what is computed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Chain hash of one full block: it names the block's tokens and every token before them."""
    return hashlib.sha256((parent or b"") + array("q", token_ids).tobytes()).digest()


def block_key(block_hash: BlockHash) -> int:
    """The block's name in cache events and routing indexes (a fixed64 on the wire)."""
    return int.from_bytes(block_hash[:8], "big")


def cacheable_blocks(num_tokens: int, block_size: int) -> int:
    """Leading full blocks of a prompt of `num_tokens` that a worker may serve from its cache: at most
    num_tokens - 1 tokens, so the step that admits the prompt still computes its last token."""
    return max(0, (num_tokens - 1) // block_size)


def prompt_block_keys(token_ids: Sequence[int], block_size: int) -> list[int]:
    """block_key of each cacheable leading block of a prompt, in order."""
    keys = []
    parent: BlockHash | None = None
    for i in range(cacheable_blocks(len(token_ids), block_size)):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        keys.append(block_key(parent))
    return keys
