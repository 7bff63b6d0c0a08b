"""BlockManager: allocation, ref counts, prefix-cache hits, caps, LRU eviction, reset, cache events (netted per
drain: replayed, they give the cache)."""

from __future__ import annotations

import random

import pytest

from common.block_hash import prompt_block_keys
from worker.kv_cache import NO_PREFIX, BlockManager, hash_block
from worker.sequence import SamplingParams, Sequence

BS = 4


def seq_of(tokens: list[int], request_id: str = "s") -> Sequence:
    return Sequence(request_id, list(tokens), SamplingParams())


def admit(bm: BlockManager, seq: Sequence, num_new_tokens: int | None = None) -> None:
    """Admit seq with its cached prefix and compute num_new_tokens (default: the rest of it)."""
    prefix = bm.get_computed_prefix(seq)
    n = seq.num_tokens - prefix.num_tokens if num_new_tokens is None else num_new_tokens
    assert bm.can_allocate(seq, n, prefix)
    bm.allocate(seq, n, prefix)
    seq.num_computed_tokens += n
    bm.register_full_blocks(seq)


def compute(bm: BlockManager, seq: Sequence, n: int) -> None:
    assert bm.can_allocate(seq, n)
    bm.allocate(seq, n)
    seq.num_computed_tokens += n
    bm.register_full_blocks(seq)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(8, BS)
    seq = seq_of(range(10))
    admit(bm, seq)
    assert len(seq.block_table) == 3 and bm.num_used_blocks == 3
    bm.check_invariants([seq])
    bm.free(seq)
    bm.free(seq)  # idempotent
    assert seq.block_table == [] and bm.num_free_blocks == 8
    bm.check_invariants([])


def test_out_of_blocks_is_false_and_changes_nothing():
    bm = BlockManager(2, BS, enable_prefix_caching=False)
    seq = seq_of(range(12))
    assert not bm.can_allocate(seq, 12)
    assert bm.can_allocate(seq, 8)
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_blocks_grow_chunk_by_chunk_and_only_when_needed():
    bm = BlockManager(8, BS)
    seq = seq_of(range(11))
    admit(bm, seq, 3)
    assert len(seq.block_table) == 1
    compute(bm, seq, 1)
    assert len(seq.block_table) == 1
    compute(bm, seq, 7)
    assert len(seq.block_table) == 3 and seq.num_computed_tokens == 11
    seq.append_token(99)
    assert bm.can_allocate(seq, 1)
    compute(bm, seq, 1)  # the 12th token still fits the third block
    assert len(seq.block_table) == 3
    bm.check_invariants([seq])


def test_same_prefix_shares_full_blocks():
    bm = BlockManager(16, BS)
    a = seq_of([5, 6, 7, 8, 9, 10, 11, 12, 13, 14], "a")
    admit(bm, a)
    assert bm.num_cached_blocks == 2  # the partial third block is not registered
    b = seq_of([5, 6, 7, 8, 9, 10, 11, 12, 40, 41], "b")
    prefix = bm.get_computed_prefix(b)
    assert prefix.block_ids == tuple(a.block_table[:2]) and prefix.num_tokens == 8
    admit(bm, b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 10
    assert [bm.blocks[i].ref_count for i in b.block_table] == [2, 2, 1]
    assert bm.num_used_blocks == 4
    bm.check_invariants([a, b])
    bm.free(a)
    bm.check_invariants([b])
    bm.free(b)
    bm.check_invariants([])


def test_a_hit_never_covers_the_last_token():
    bm = BlockManager(16, BS)
    a = seq_of(range(8), "a")
    admit(bm, a)
    assert bm.num_cached_blocks == 2
    same = seq_of(range(8), "same")
    assert bm.get_computed_prefix(same).num_tokens == 4  # (8 - 1) // 4 blocks
    longer = seq_of(range(9), "longer")
    assert bm.get_computed_prefix(longer).num_tokens == 8


def test_hash_chain_depends_on_everything_before_the_block():
    bm = BlockManager(16, BS)
    admit(bm, seq_of([1, 2, 3, 4, 5, 6, 7, 8, 0], "a"))
    moved = seq_of([9, 9, 9, 9, 5, 6, 7, 8, 0], "b")  # same second block after a different first one
    assert bm.get_computed_prefix(moved) == NO_PREFIX
    assert hash_block(None, [5, 6, 7, 8]) != hash_block(hash_block(None, [1, 2, 3, 4]), [5, 6, 7, 8])


def test_freed_blocks_stay_cached_until_needed_and_are_revived():
    bm = BlockManager(4, BS)
    a = seq_of(range(10), "a")
    admit(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2  # two cached, two plain free
    b = seq_of([*range(8), 50, 51, 52, 53, 54], "b")
    prefix = bm.get_computed_prefix(b)
    assert prefix.num_tokens == 8
    assert bm.can_allocate(b, 5, prefix)  # 2 revived + 2 new == 4
    assert not bm.can_allocate(b, 9, prefix)
    admit(bm, b)
    assert bm.num_free_blocks == 0 and b.num_cached_tokens == 8
    bm.check_invariants([b])


def test_eviction_under_pressure_is_lru_with_the_tail_first():
    bm = BlockManager(6, BS)
    old = seq_of(range(100, 109), "old")  # 2 full blocks cached
    new = seq_of(range(200, 209), "new")
    admit(bm, old)
    admit(bm, new)
    bm.free(old)
    bm.free(new)
    assert bm.num_cached_blocks == 4 and bm.num_free_blocks == 6
    big = seq_of(range(300, 311), "big")  # 3 blocks: 2 plain free blocks, then evicts old's tail block
    admit(bm, big)
    assert bm.num_cached_blocks == 3 + 2  # old's head, new's two, and big's own two full blocks
    assert bm.get_computed_prefix(seq_of(range(100, 109))).num_tokens == 4
    assert bm.get_computed_prefix(seq_of(range(200, 209))).num_tokens == 8
    bm.check_invariants([big])


def test_an_equal_block_computed_twice_is_cached_once():
    bm = BlockManager(8, BS)
    a, b = seq_of(range(6), "a"), seq_of(range(6), "b")
    admit(bm, a, 0)
    admit(bm, b, 0)  # both admitted before either computed: no hit
    compute(bm, a, 6)
    compute(bm, b, 6)
    assert bm.num_cached_blocks == 1 and a.block_table[0] != b.block_table[0]
    bm.free(b)
    bm.free(a)
    assert bm.num_cached_blocks == 1 and bm.num_free_blocks == 8
    bm.check_invariants([])


def test_prefix_caching_off_never_hits_nor_keeps():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = seq_of(range(10), "a")
    admit(bm, a)
    assert bm.num_cached_blocks == 0
    assert bm.get_computed_prefix(seq_of(range(10), "b")) == NO_PREFIX
    bm.free(a)
    bm.check_invariants([])


def test_reset_prefix_cache_forgets_free_and_used_blocks():
    bm = BlockManager(8, BS)
    a, b = seq_of(range(9), "a"), seq_of(range(50, 59), "b")
    admit(bm, a)
    admit(bm, b)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 5
    assert bm.get_computed_prefix(seq_of(range(9))) == NO_PREFIX
    bm.check_invariants([b])
    b.append_token(7)
    b.append_token(8)
    b.append_token(9)
    compute(bm, b, 3)  # keeps registering later blocks after the reset
    assert bm.num_cached_blocks == 1
    bm.free(b)
    bm.check_invariants([])
    assert bm.num_free_blocks == 8


# ---- cache events (Worker.CacheEvents)


def _apply(view: set[int], events: tuple[list[int], list[int]]) -> set[int]:
    stored, evicted = events
    assert not set(stored) & set(evicted), "a batch's lists are disjoint"
    return (view - set(evicted)) | set(stored)


def test_cache_events_name_the_workers_blocks_and_follow_eviction():
    bm = BlockManager(4, BS)
    a = seq_of(range(9), "a")  # two full blocks registered, the third partial
    admit(bm, a)
    stored, evicted = bm.drain_cache_events()
    assert stored == prompt_block_keys(list(range(9)), BS) and evicted == []
    assert bm.drain_cache_events() == ([], [])
    bm.free(a)
    b = seq_of(range(100, 116), "b")  # needs all 4 blocks: a's two cached ones are evicted (reused)
    admit(bm, b)
    stored, evicted = bm.drain_cache_events()
    assert sorted(evicted) == sorted(prompt_block_keys(list(range(9)), BS))
    assert stored == prompt_block_keys(list(range(100, 117)), BS)  # every full computed block, the 4th included
    assert set(bm.cached_block_keys()) == set(stored)
    bm.check_invariants([b])


def test_a_key_evicted_then_stored_again_or_stored_then_evicted_within_one_drain_is_in_neither_list():
    bm = BlockManager(2, BS)
    a = seq_of(range(5), "a")  # one full block (cached once freed) and a partial one (freed)
    admit(bm, a)
    bm.free(a)
    [key_a] = bm.drain_cache_events()[0]
    b = seq_of(range(50, 58), "b")  # takes the free block and evicts a's; its two blocks are cached
    admit(bm, b)
    bm.free(b)
    keys_b = set(bm.cached_block_keys())
    assert key_a not in keys_b and len(keys_b) == 2
    again = seq_of(range(5), "a2")  # a's block was evicted: computed again, evicting b's, and cached again
    admit(bm, again)
    assert again.num_cached_tokens == 0 and bm.cached_block_keys() == [key_a]
    # key_a: cached at the last drain and now; b's: neither then nor now. Nothing to tell.
    assert bm.drain_cache_events() == ([], [])
    bm.check_invariants([again])


def test_a_key_cached_at_the_last_drain_and_evicted_is_evicted_and_a_new_one_stored():
    bm = BlockManager(1, BS)
    a = seq_of(range(4), "a")  # 4 tokens: one full block, cached
    admit(bm, a)
    bm.free(a)
    [key_a] = bm.drain_cache_events()[0]
    b = seq_of(range(10, 14), "b")
    admit(bm, b)
    [key_b] = bm.cached_block_keys()
    assert bm.drain_cache_events() == ([key_b], [key_a])


def test_reset_evicts_every_key_and_a_key_stored_since_the_last_drain_is_in_neither_list():
    bm = BlockManager(8, BS)
    a = seq_of(range(9), "a")
    admit(bm, a)
    keys = bm.drain_cache_events()[0]
    b = seq_of(range(20, 25), "b")  # stored after the drain, reset before the next one
    admit(bm, b)
    bm.reset_prefix_cache()
    stored, evicted = bm.drain_cache_events()
    assert stored == [] and sorted(evicted) == sorted(keys) and len(keys) == 2
    assert bm.cached_block_keys() == []
    bm.check_invariants([a, b])


def test_no_prefix_caching_means_no_events():
    off = BlockManager(2, BS, enable_prefix_caching=False)
    for i in range(4):  # every allocation reuses the same blocks
        s = seq_of(range(i, i + 8), f"s{i}")
        admit(off, s)
        off.free(s)
    off.reset_prefix_cache()
    assert off.drain_cache_events() == ([], []) and off.cached_block_keys() == []


@pytest.mark.parametrize("seed", range(4))
def test_drained_events_replay_to_the_cache_under_random_load(seed):
    """Random admissions (shared prefixes: hits), frees, evictions and resets, drained at random points: the view
    built from the batches alone is the cache after every drain."""
    rng = random.Random(seed)
    bm = BlockManager(12, BS)
    bases = [[rng.randrange(6) for _ in range(12)] for _ in range(3)]
    view: set[int] = set()
    live: list[Sequence] = []
    for i in range(500):
        op = rng.random()
        if op < 0.5:
            seq = seq_of(rng.choice(bases)[: rng.randint(0, 12)] + [rng.randrange(6) for _ in range(rng.randint(1, 6))],
                         f"s{i}")
            prefix = bm.get_computed_prefix(seq)
            n = seq.num_tokens - prefix.num_tokens
            if bm.can_allocate(seq, n, prefix):
                bm.allocate(seq, n, prefix)
                seq.num_computed_tokens += n
                bm.register_full_blocks(seq)
                live.append(seq)
        elif op < 0.9 and live:
            bm.free(live.pop(rng.randrange(len(live))))
        elif op > 0.98:
            bm.reset_prefix_cache()
        if rng.random() < 0.2:
            view = _apply(view, bm.drain_cache_events())
            assert view == set(bm.cached_block_keys())
    bm.check_invariants(live)
    assert _apply(view, bm.drain_cache_events()) == set(bm.cached_block_keys())
