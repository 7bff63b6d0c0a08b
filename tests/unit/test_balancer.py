"""Balancer: filtering, power of two choices, load score, model counts (plain lists, seeded rng)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.balancer import WorkerState, candidates, load_score, models, pick

MODEL = "llama-2-7b"


def worker(address: str, model: str = MODEL, *, healthy: bool = True, in_flight: int = 0, pending: int = 0,
           waiting: int = 0, running: int = 0, total_blocks: int = 100, max_num_seqs: int = 8,
           kv_capacity_tokens: int = 1600) -> WorkerState:
    """A WorkerState with idle defaults."""
    return WorkerState(address, model, healthy, in_flight, pending, waiting, running, total_blocks, total_blocks,
                       max_num_seqs, kv_capacity_tokens)


def test_filters_unhealthy_other_model_and_excluded() -> None:
    workers = [worker("sick", healthy=False), worker("other", model="llama-2-13b"), worker("tried"), worker("ok")]
    rng = random.Random(0)
    for _ in range(200):
        assert pick(workers, MODEL, rng, frozenset({"tried"})).address == "ok"


def test_none_when_nothing_fits() -> None:
    rng = random.Random(0)
    assert pick([], MODEL, rng) is None
    assert pick([worker("sick", healthy=False), worker("other", model="x")], MODEL, rng) is None
    assert pick([worker("a"), worker("b")], MODEL, rng, frozenset({"a", "b"})) is None


def test_single_candidate_is_returned_even_if_loaded() -> None:
    busy = worker("busy", in_flight=50, pending=10_000)
    assert pick([busy, worker("sick", healthy=False)], MODEL, random.Random(0)) is busy


def test_loaded_worker_avoided_among_idle_ones() -> None:
    workers = [worker("loaded", in_flight=20, waiting=10, running=8, pending=1500)]
    workers += [worker(f"idle{i}") for i in range(9)]
    rng = random.Random(1)
    picks = Counter(pick(workers, MODEL, rng).address for _ in range(5000))
    assert picks["loaded"] == 0


@pytest.mark.parametrize("n", [2, 3, 5, 16])
def test_most_loaded_never_chosen(n: int) -> None:
    workers = [worker(f"w{i}", in_flight=i, pending=37 * i) for i in range(n)]
    rng = random.Random(n)
    picks = Counter(pick(workers, MODEL, rng).address for _ in range(3000))
    assert picks[f"w{n - 1}"] == 0
    assert picks["w0"] > 0


def test_equal_workers_roughly_uniform() -> None:
    workers = [worker(f"w{i}", in_flight=2, pending=100) for i in range(5)]
    rng = random.Random(42)
    picks = Counter(pick(workers, MODEL, rng).address for _ in range(10_000))
    assert set(picks) == {w.address for w in workers}
    assert all(1600 <= c <= 2400 for c in picks.values()), picks


def test_deterministic_given_seed() -> None:
    workers = [worker(f"w{i}", in_flight=i % 3) for i in range(6)]
    first = [pick(workers, MODEL, random.Random(7)).address for _ in range(3)]
    rng_a, rng_b = random.Random(7), random.Random(7)
    assert [pick(workers, MODEL, rng_a) for _ in range(50)] == [pick(workers, MODEL, rng_b) for _ in range(50)]
    assert len(set(first)) == 1


def test_load_score_orders_requests_and_tokens() -> None:
    assert load_score(worker("a")) == 0
    assert load_score(worker("a", in_flight=1)) < load_score(worker("a", in_flight=2))
    assert load_score(worker("a", running=4)) < load_score(worker("a", waiting=4))
    # Equal request counts: more pending tokens scores higher; a full KV cache of tokens weighs max_num_seqs requests.
    assert load_score(worker("a", in_flight=1, pending=100)) < load_score(worker("a", in_flight=1, pending=900))
    assert load_score(worker("a", pending=1600)) == pytest.approx(8)
    # Unknown capacity falls back to blocks * 16; zero blocks does not divide by zero.
    assert load_score(worker("a", pending=1600, kv_capacity_tokens=0)) == pytest.approx(8)
    assert load_score(worker("a", pending=5, total_blocks=0, kv_capacity_tokens=0)) == pytest.approx(40)


def test_models_counts_only_healthy() -> None:
    workers = [worker("a"), worker("b"), worker("c", healthy=False), worker("d", model="llama-2-13b"),
               worker("e", model="llama-2-70b", healthy=False)]
    assert models(workers) == {"llama-2-13b": 1, MODEL: 2}
    assert models([]) == {}


worker_states = st.builds(
    worker,
    address=st.sampled_from([f"w{i}" for i in range(6)]),
    model=st.sampled_from([MODEL, "other"]),
    healthy=st.booleans(),
    in_flight=st.integers(0, 50),
    pending=st.integers(0, 100_000),
    waiting=st.integers(0, 20),
    running=st.integers(0, 20),
    total_blocks=st.integers(0, 1000),
    max_num_seqs=st.integers(0, 64),
    kv_capacity_tokens=st.integers(0, 16_000),
)


@given(st.lists(worker_states, max_size=12), st.frozensets(st.sampled_from([f"w{i}" for i in range(6)])),
       st.integers(0, 2**32))
def test_pick_is_a_filtered_candidate(workers: list[WorkerState], exclude: frozenset[str], seed: int) -> None:
    pool = candidates(workers, MODEL, exclude)
    chosen = pick(workers, MODEL, random.Random(seed), exclude)
    if not pool:
        assert chosen is None
    else:
        assert chosen in pool
        assert chosen.is_healthy and chosen.model == MODEL and chosen.address not in exclude
        scores = sorted(load_score(w) for w in pool)
        if len(pool) >= 2 and scores[-1] > scores[-2]:
            assert load_score(chosen) < scores[-1]  # a strictly most-loaded worker always loses its pair
