"""Paged KV block accounting with prefix caching: block tables, ref counts, free and cached blocks."""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from common.block_hash import BlockHash, block_key, cacheable_blocks, hash_block
from worker.sequence import Sequence

__all__ = ["NO_PREFIX", "BlockHash", "BlockManager", "CachedPrefix", "hash_block"]


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None  # set once the block is full of computed tokens and registered
    key: int = 0  # block_key(block_hash): its name in cache events


class CachedPrefix(NamedTuple):
    """Leading full blocks of a sequence found in the prefix cache, and the tokens they hold."""

    block_ids: tuple[int, ...] = ()
    num_tokens: int = 0


NO_PREFIX = CachedPrefix()


class BlockManager:
    """Hands out fixed-size KV blocks to sequences; the KV tensors themselves live in the model runner.

    A block is in exactly one of three states: free (ref_count 0, no hash), cached-evictable
    (ref_count 0, registered hash, kept in LRU order until its space is needed) or in use (ref_count > 0).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._cached: dict[BlockHash, int] = {}  # hash -> block id
        self._seq_hashes: dict[Sequence, list[BlockHash]] = {}  # chain of each seq's registered blocks
        # cache events: the keys cached now, and for each key changed since the last drain whether it was cached then
        self._keys: set[int] = set()
        self._changed: dict[int, bool] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take now: free ones plus cached ones nobody uses."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def get_computed_prefix(self, seq: Sequence) -> CachedPrefix:
        """Called by the scheduler before admitting seq (new or preempted): its cached leading full blocks.

        At most num_tokens - 1 tokens (block-aligned down) are served from cache, so that the step that
        admits seq computes at least its last token and produces logits.
        """
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        if not self.enable_prefix_caching:
            return NO_PREFIX
        bs = self.block_size
        block_ids: list[int] = []
        parent: BlockHash | None = None
        for i in range(cacheable_blocks(seq.num_tokens, bs)):
            parent = hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs])
            block_id = self._cached.get(parent)
            if block_id is None:
                break
            block_ids.append(block_id)
        return CachedPrefix(tuple(block_ids), len(block_ids) * bs)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, prefix: CachedPrefix = NO_PREFIX) -> bool:
        """True when allocate(seq, num_new_tokens, prefix) would succeed now; changes nothing."""
        assert not (prefix.block_ids and seq.block_table), "a prefix is only shared on admission"
        num_revived = sum(1 for b in prefix.block_ids if self.blocks[b].ref_count == 0)
        return self._num_new_blocks(seq, num_new_tokens, prefix) + num_revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix: CachedPrefix = NO_PREFIX) -> None:
        """Grow seq.block_table to cover num_computed_tokens + num_new_tokens; only after can_allocate.

        On admission (empty block table) the prefix blocks are shared (ref_count += 1) and their tokens
        count as computed: seq.num_computed_tokens and seq.num_cached_tokens are set from the prefix.
        """
        assert self.can_allocate(seq, num_new_tokens, prefix), f"{seq.request_id}: out of blocks"
        num_new_blocks = self._num_new_blocks(seq, num_new_tokens, prefix)
        if not seq.block_table:  # admission
            assert seq.num_computed_tokens == 0
            for block_id in prefix.block_ids:
                self._touch(self.blocks[block_id])
            seq.block_table = list(prefix.block_ids)
            seq.num_computed_tokens = prefix.num_tokens
            seq.num_cached_tokens = min(prefix.num_tokens, seq.num_prompt_tokens)
            self._seq_hashes[seq] = [self.blocks[b].block_hash for b in prefix.block_ids]
        for _ in range(num_new_blocks):
            seq.block_table.append(self._take_block())

    def register_full_blocks(self, seq: Sequence) -> None:
        """Called after a step advanced seq.num_computed_tokens: offer its newly full blocks to the cache.

        A block whose hash is already cached elsewhere (two equal prompts computed in the same step)
        stays unregistered and goes back to the free list when released.
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        hashes = self._seq_hashes[seq]
        for i in range(len(hashes), seq.num_computed_tokens // bs):
            block_hash = hash_block(hashes[-1] if hashes else None, seq.token_ids[i * bs : (i + 1) * bs])
            hashes.append(block_hash)
            block = self.blocks[seq.block_table[i]]
            assert block.block_hash is None and block.ref_count == 1, f"block {block.block_id} is shared"
            if block_hash not in self._cached:
                block.block_hash = block_hash
                block.key = block_key(block_hash)
                self._cached[block_hash] = block.block_id
                self._note(block.key, True)

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks (finish, abort or preemption) and clear its block table; idempotent.

        Registered blocks that drop to ref_count 0 stay cached; the tail of the sequence is queued for
        eviction first, since later blocks are the least likely to be shared.
        """
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                if block.block_hash is None:
                    self._free.append(block_id)
                else:
                    self._evictable[block_id] = None
        seq.block_table = []
        self._seq_hashes.pop(seq, None)

    def cached_block_keys(self) -> list[int]:
        """The key of every cached block (a CacheEvents snapshot)."""
        return list(self._keys)

    def drain_cache_events(self) -> tuple[list[int], list[int]]:
        """(stored, evicted) keys since the last drain, netted against the cache then: a key cached then and now
        (evicted and stored again) is in neither, one stored and evicted in between too. The lists are disjoint, so
        applying them in any order to the cache as it was at the last drain gives the cache now."""
        changed, self._changed = self._changed, {}
        stored, evicted = [], []
        for key, was in changed.items():
            now = key in self._keys
            if now and not was:
                stored.append(key)
            elif was and not now:
                evicted.append(key)
        return stored, evicted

    def _note(self, key: int, cached: bool) -> None:
        self._changed.setdefault(key, key in self._keys)
        if cached:
            self._keys.add(key)
        else:
            self._keys.discard(key)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (after warm-up, or when weights change); blocks in use stay allocated."""
        for key in list(self._keys):
            self._note(key, False)
        for block in self.blocks:
            block.block_hash = None
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._cached.clear()

    def check_invariants(self, seqs: Iterable[Sequence] | None = None) -> None:
        """Assert the bookkeeping is consistent (tests); given every live seq, also check the ref counts."""
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not free & evictable
        for block in self.blocks:
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) == block.block_id
            if block.block_id in free:
                assert block.ref_count == 0 and block.block_hash is None
            elif block.block_id in evictable:
                assert block.ref_count == 0 and block.block_hash is not None
            else:
                assert block.ref_count > 0, f"block {block.block_id} leaked"
        assert len(self._cached) == sum(1 for b in self.blocks if b.block_hash is not None)
        assert self._keys == {block_key(h) for h in self._cached}, "cache-event keys out of step"
        if seqs is not None:
            seqs = list(seqs)
            refs = Counter(block_id for seq in seqs for block_id in seq.block_table)
            for block in self.blocks:
                assert block.ref_count == refs[block.block_id], f"block {block.block_id} ref count"
            assert set(self._seq_hashes) <= set(seqs)

    def _num_new_blocks(self, seq: Sequence, num_new_tokens: int, prefix: CachedPrefix) -> int:
        num_tokens = max(seq.num_computed_tokens, prefix.num_tokens) + num_new_tokens
        num_held = len(seq.block_table) or len(prefix.block_ids)
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def _touch(self, block: Block) -> None:
        if block.ref_count == 0:
            del self._evictable[block.block_id]
        block.ref_count += 1

    def _take_block(self) -> int:
        if self._free:
            block = self.blocks[self._free.popleft()]
        else:
            block_id, _ = self._evictable.popitem(last=False)  # evict the least recently used
            block = self.blocks[block_id]
            del self._cached[block.block_hash]
            block.block_hash = None
            self._note(block.key, False)
        block.ref_count = 1
        return block.block_id
