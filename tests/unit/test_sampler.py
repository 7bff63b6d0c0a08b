"""Sampler: greedy, transformers-exact filters and penalty, seeded reproducibility, distribution."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from worker.sampler import apply_penalties, apply_repetition_penalty, apply_top_k, apply_top_p, sample, token_seed
from worker.sequence import SamplingParams

VOCAB = 97


def _logits(num_rows: int, seed: int = 0, vocab: int = VOCAB, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((num_rows, vocab), generator=gen) * scale


def _histories(num_rows: int, length: int = 12, vocab: int = VOCAB) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(num_rows)]


def test_greedy_batch_is_argmax():
    logits = _logits(8)
    params = [SamplingParams()] * 8
    assert sample(logits, params, _histories(8), [0] * 8) == logits.argmax(dim=-1).tolist()


def test_greedy_rows_in_a_mixed_batch_are_argmax():
    logits = _logits(6)
    params = [SamplingParams() if i % 2 else SamplingParams(temperature=1.0, seed=i) for i in range(6)]
    out = sample(logits, params, _histories(6), [0] * 6)
    assert out[1::2] == logits.argmax(dim=-1)[1::2].tolist()


def test_greedy_with_repetition_penalty_uses_penalized_logits():
    logits = torch.tensor([[2.0, 1.9, -1.0], [2.0, 1.0, -1.0]])
    params = [SamplingParams(repetition_penalty=1.2), SamplingParams()]
    assert sample(logits, params, [[0], [0]], [0, 0]) == [1, 0]


@pytest.mark.parametrize("k", [1, 2, 5, 50, VOCAB, VOCAB + 10])
def test_top_k_matches_transformers(k):
    logits = _logits(16, seed=k)
    expected = TopKLogitsWarper(top_k=k)(None, logits.clone())
    assert torch.equal(apply_top_k(logits, k), expected)


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.8, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("scale", [0.5, 3.0, 20.0])
def test_top_p_matches_transformers(p, scale):
    logits = _logits(16, seed=int(p * 1000), scale=scale)
    expected = TopPLogitsWarper(top_p=p)(None, logits.clone())
    assert torch.equal(apply_top_p(logits, p), expected)


def test_per_row_filters_match_transformers_row_by_row():
    logits = _logits(5, seed=7)
    ks, ps = [0, 1, 3, 10, 0], [1.0, 0.5, 0.9, 0.7, 0.3]
    by_k, by_p = apply_top_k(logits, ks), apply_top_p(logits, ps)
    for row in range(5):
        one = logits[row : row + 1]
        want_k = TopKLogitsWarper(top_k=ks[row])(None, one.clone()) if ks[row] else one
        want_p = TopPLogitsWarper(top_p=ps[row])(None, one.clone()) if ps[row] < 1 else one
        assert torch.equal(by_k[row : row + 1], want_k)
        assert torch.equal(by_p[row : row + 1], want_p)


def test_top_p_after_top_k_matches_transformers_chain():
    logits = _logits(8, seed=3)
    expected = TopPLogitsWarper(top_p=0.8)(None, TopKLogitsWarper(top_k=20)(None, logits.clone()))
    assert torch.equal(apply_top_p(apply_top_k(logits, 20), 0.8), expected)


@pytest.mark.parametrize("penalty", [0.5, 1.1, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    logits = _logits(4, seed=11)
    histories = _histories(4, length=30)
    expected = RepetitionPenaltyLogitsProcessor(penalty=penalty)(torch.tensor(histories), logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, histories, [penalty] * 4), expected)


def test_repetition_penalty_per_row_lengths_and_out_of_vocab_ids():
    logits = _logits(3, seed=12)
    out = apply_repetition_penalty(logits, [[1, 2, 2, VOCAB + 5], [], [5]], [1.5, 1.5, 0.8])
    first = RepetitionPenaltyLogitsProcessor(penalty=1.5)(torch.tensor([[1, 2, 2]]), logits[0:1].clone())
    last = RepetitionPenaltyLogitsProcessor(penalty=0.8)(torch.tensor([[5]]), logits[2:3].clone())
    assert torch.equal(out, torch.cat([first, logits[1:2], last]))


def _seeded(seed: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=kw.pop("temperature", 1.0), seed=seed, **kw)


def test_seeded_rows_are_the_same_alone_and_in_any_batch():
    logits = _logits(5, seed=21, scale=1.0)
    target = (_seeded(1234, top_p=0.95, top_k=40, repetition_penalty=1.1), logits[0], [3, 3, 9])
    mates = [
        (SamplingParams(), logits[1], [1]),
        (SamplingParams(temperature=0.7), logits[2], [2, 4]),
        (_seeded(5, temperature=1.5, top_k=3), logits[3], []),
        (SamplingParams(temperature=1.0, top_p=0.5, repetition_penalty=1.3), logits[4], [7, 8, 9]),
    ]
    alone = [sample(target[1][None], [target[0]], [target[2]], [step])[0] for step in range(20)]
    for size in range(len(mates) + 1):
        for position in range(size + 1):
            rows = [*mates[:position], target, *mates[position:size]]
            params, histories = [r[0] for r in rows], [r[2] for r in rows]
            batch_logits = torch.stack([r[1] for r in rows])
            steps = [sample(batch_logits, params, histories, [step] * len(rows)) for step in range(20)]
            got = [tokens[position] for tokens in steps]
            assert got == alone, (size, position)


def test_seeded_row_depends_on_output_index_not_on_call_order():
    logits = _logits(1, seed=22, scale=0.3)
    params = [_seeded(99)]
    forward = [sample(logits, params, [[]], [i])[0] for i in range(30)]
    backward = [sample(logits, params, [[]], [i])[0] for i in reversed(range(30))]
    assert forward == backward[::-1]
    assert len(set(forward)) > 1


def test_different_seeds_give_different_streams():
    logits = _logits(1, seed=23, scale=0.3)
    a = [sample(logits, [_seeded(1)], [[]], [i])[0] for i in range(30)]
    b = [sample(logits, [_seeded(2)], [[]], [i])[0] for i in range(30)]
    assert a != b


def test_token_seed_is_a_64_bit_mix():
    seeds = {token_seed(s, i) for s in range(50) for i in range(50)}
    assert len(seeds) == 2500
    assert all(0 <= s < 2**64 for s in seeds)
    assert token_seed(2**63 - 1, 10**6) < 2**64


def test_top_k_one_is_greedy_even_when_sampling():
    logits = _logits(4, seed=24)
    params = [SamplingParams(temperature=2.0, top_k=1)] * 4
    assert sample(logits, params, [[]] * 4, [0] * 4) == logits.argmax(dim=-1).tolist()


def test_sampled_tokens_stay_inside_the_top_p_set():
    logits = _logits(1, seed=25, scale=2.0)
    allowed = set(torch.nonzero(apply_top_p(logits / 0.7, 0.5)[0] > -math.inf).flatten().tolist())
    drawn = {sample(logits, [_seeded(s, temperature=0.7, top_p=0.5)], [[]], [0])[0] for s in range(300)}
    assert drawn <= allowed


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_seeded_samples_follow_softmax(temperature):
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 2.0]])
    probs = torch.softmax(logits[0] / temperature, dim=-1)
    num_draws = 4000
    counts = torch.zeros(6)
    batch = [_seeded(s, temperature=temperature) for s in range(num_draws)]
    drawn = sample(logits.expand(num_draws, -1), batch, [[]] * num_draws, [7] * num_draws)
    for t in drawn:
        counts[t] += 1
    expected = probs * num_draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30.0  # 5 degrees of freedom: p ~ 1e-5


def test_unseeded_sampling_varies_and_stays_in_range():
    logits = torch.zeros(1, 50)
    drawn = {sample(logits, [SamplingParams(temperature=1.0)], [[]], [0])[0] for _ in range(40)}
    assert len(drawn) > 5
    assert all(0 <= t < 50 for t in drawn)


def test_presence_and_frequency_penalties_count_output_tokens_only():
    """vLLM's semantics: logit - frequency * count - presence * (count > 0), counted over the row's output only."""
    logits = _logits(3, seed=21)
    histories = [[5, 6, 7, 8, 8, 9], [1, 2, 3], [4, 4, 4, 4]]
    outputs = [2, 0, 3]  # the last 2 of row 0 (8, 9), none of row 1, the last 3 of row 2 (4, 4, 4)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=1.5), SamplingParams(presence_penalty=2.0),
              SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5)]
    got = apply_penalties(logits, params, histories, outputs)
    want = logits.clone()
    want[0, 8] -= 1.5 + 0.5
    want[0, 9] -= 1.5 + 0.5
    want[2, 4] -= -0.5 * 3 - 1.0
    assert torch.allclose(got, want) and got[1].equal(logits[1])


@pytest.mark.parametrize("generated", [0, 3, 4, 9])
def test_min_new_tokens_matches_transformers(generated):
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

    logits = _logits(2, seed=22)
    prompt = [9, 8, 7]
    history = prompt + list(range(10, 10 + generated))
    processor = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=len(prompt), min_new_tokens=4,
                                                  eos_token_id=[2, 5])
    want = processor(torch.tensor([history, history]), logits.clone())
    got = apply_penalties(logits, [SamplingParams(min_new_tokens=4)] * 2, [history] * 2, [generated] * 2,
                          [frozenset({2, 5})] * 2)
    assert torch.equal(got, want)
    assert sample(logits, [SamplingParams(min_new_tokens=4)] * 2, [history] * 2, [generated] * 2,
                  [frozenset({2, 5})] * 2) == want.argmax(dim=-1).tolist()
