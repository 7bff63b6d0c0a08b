"""Cache-aware routing's pure parts: a worker's cache view from its events, the prompt's blocks as the worker names
them, and the choice of worker by cached tokens against load (seeded rng, plain lists)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from common.block_hash import prompt_block_keys
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from router.balancer import CACHE, LOAD, NO_VIEW, SPILL, load_score, pick_cached
from router.cache_view import CacheView
from router.prompt_blocks import PromptEncoder
from tests.unit.test_balancer import MODEL, worker


def test_view_follows_snapshot_batches_and_epochs():
    view = CacheView()
    assert not view.live and view.matched_blocks([1]) == 0
    view.apply(wpb.CacheEvent(epoch="a", snapshot=True, stored=[1, 2], block_size=16))
    assert view.live and view.block_size == 16 and view.keys == {1, 2}
    view.apply(wpb.CacheEvent(epoch="a", stored=[3], evicted=[1]))
    assert view.keys == {2, 3}
    view.apply(wpb.CacheEvent(epoch="b", stored=[9]))  # another epoch's batch without its snapshot: not placed
    assert view.keys == {2, 3}
    view.apply(wpb.CacheEvent(epoch="b", snapshot=True, block_size=16))  # a restarted worker: empty again
    assert view.live and view.keys == set()
    view.clear()
    assert not view.live


def test_a_match_is_the_chain_up_to_the_first_miss():
    view = CacheView()
    view.apply(wpb.CacheEvent(epoch="a", snapshot=True, stored=[1, 2, 4], block_size=16))
    assert view.matched_blocks([1, 2, 3, 4]) == 2
    assert view.matched_blocks([5, 1, 2]) == 0
    assert view.matched_blocks([]) == 0


def test_prompt_blocks_are_the_workers_blocks(tiny_model_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)
    encoder = PromptEncoder(hf.backend_tokenizer.to_str(), 16)
    text = "You are a helpful assistant. " * 20 + "What is the capital of France?"
    ids = list(hf(text, add_special_tokens=True)["input_ids"])  # what worker.tokenizer.encode_prompt gives
    blocks = encoder.blocks(text)
    assert blocks.num_tokens == len(ids) and blocks.block_size == 16
    assert list(blocks.keys) == prompt_block_keys(ids, 16) and len(blocks.keys) == (len(ids) - 1) // 16
    assert encoder.chunked
    assert encoder.blocks(text + " Why?").keys[: len(blocks.keys) - 1] == blocks.keys[:-1]


def test_prompts_cut_in_pieces_tokenize_as_a_whole(tiny_model_dir):
    """Shared prefixes with varied suffixes, odd spacing and characters outside the vocabulary: the pieces' ids (and
    the blocks kept from earlier prompts) are exactly the whole text's."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)
    encoder = PromptEncoder(hf.backend_tokenizer.to_str(), 16)
    rng = random.Random(4)
    words = ["the", "cat", "sat", "on", "mat.", "Über", "東京", "x=1;", "\n", "😀", "a"]
    seps = [" ", " ", " ", "  ", "\n", "\t", " \n "]
    prefixes = ["".join(rng.choice(words) + rng.choice(seps) for _ in range(300)) for _ in range(3)]
    for n in range(30):
        suffix = "".join(rng.choice(seps) + rng.choice(words) for _ in range(rng.randrange(0, 40)))
        text = rng.choice(prefixes) + suffix if n % 5 else suffix
        ids = list(hf(text, add_special_tokens=True)["input_ids"])
        blocks = encoder.blocks(text)
        assert blocks.num_tokens == len(ids) and list(blocks.keys) == prompt_block_keys(ids, 16), n


def test_cached_tokens_win_until_load_outweighs_them():
    rng = random.Random(0)
    holder, other = worker("holder", in_flight=3), worker("other")
    # 1,024 cached tokens at 256 per request are worth 4 requests: holder (load 3) still wins
    for _ in range(50):
        chosen, reason = pick_cached([holder, other], MODEL, rng, {"holder": 1024, "other": 0}, 256)
        assert (chosen.address, reason) == ("holder", CACHE)
    busy = worker("holder", in_flight=6)
    chosen, reason = pick_cached([busy, other], MODEL, rng, {"holder": 1024, "other": 0}, 256)
    assert (chosen.address, reason) == ("other", SPILL)
    assert load_score(busy) - 1024 / 256 > load_score(other)


def test_no_match_or_no_view_falls_back_to_load():
    rng = random.Random(1)
    a, b = worker("a", in_flight=5), worker("b")
    chosen, reason = pick_cached([a, b], MODEL, rng, {"a": 0, "b": 0}, 256)
    assert (chosen.address, reason) == ("b", LOAD)
    chosen, reason = pick_cached([a, b], MODEL, rng, {}, 256)
    assert (chosen.address, reason) == ("b", NO_VIEW)
    assert pick_cached([a], MODEL, rng, {"a": 64}, 256, exclude=frozenset({"a"})) == (None, LOAD)


def test_a_hot_prefix_spreads_once_its_holder_is_loaded():
    """Every request carries the same prefix of 2,048 tokens (worth 8 requests at 256); each choice adds a request to
    the chosen worker, and past 40 in flight the busiest worker finishes one. The
    first holder takes requests until it is 8 ahead; then the others take the prefix too, and the load evens out."""
    rng = random.Random(2)
    in_flight = Counter()
    holders: set[str] = {"w0"}
    for _ in range(400):
        workers = [worker(f"w{i}", in_flight=in_flight[f"w{i}"]) for i in range(4)]
        cached = {w.address: 2048 if w.address in holders else 0 for w in workers}
        chosen, _ = pick_cached(workers, MODEL, rng, cached, 256)
        in_flight[chosen.address] += 1
        holders.add(chosen.address)
        while sum(in_flight.values()) > 40:
            busiest = max(in_flight, key=in_flight.get)
            in_flight[busiest] -= 1
    assert holders == {"w0", "w1", "w2", "w3"}
    assert max(in_flight.values()) - min(in_flight[f"w{i}"] for i in range(4)) <= 2


@pytest.mark.parametrize("affinity", [1, 64, 4096])
def test_ties_are_broken_at_random_among_equals(affinity):
    rng = random.Random(3)
    workers = [worker("a"), worker("b"), worker("c", in_flight=1)]
    seen = Counter(pick_cached(workers, MODEL, rng, {"a": 512, "b": 512, "c": 0}, affinity)[0].address
                   for _ in range(200))
    assert set(seen) == {"a", "b"} and min(seen.values()) > 50


def test_a_prompt_nobody_holds_is_read_one_piece_only(tiny_model_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)
    encoder = PromptEncoder(hf.backend_tokenizer.to_str(), 16)
    text = "one two three four five six seven eight nine ten. " * 40
    whole = encoder.blocks(text)
    fresh = PromptEncoder(hf.backend_tokenizer.to_str(), 16)
    first = fresh.blocks(text, held=lambda key: False)
    assert 0 < first.num_tokens < whole.num_tokens and whole.keys[: len(first.keys)] == first.keys
    some = set(whole.keys[:20])
    partial = fresh.blocks(text, held=some.__contains__)
    assert whole.keys[:20] == partial.keys[:20] and len(partial.keys) < len(whole.keys)
