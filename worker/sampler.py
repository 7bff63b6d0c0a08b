"""Batched next-token sampling with per-request repetition penalty, temperature, top-k, top-p and seed."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker.sequence import SamplingParams

_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15
_shared_generators: dict[torch.device, torch.Generator] = {}


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    token_histories: Sequence[Sequence[int]],
    output_indices: Sequence[int],
) -> list[int]:
    """Pick one token per row of logits [N, V] (fp32).

    token_histories[i] holds row i's prompt + output ids (for the repetition penalty); output_indices[i]
    counts the tokens row i already generated. A seeded row draws its randomness from (seed,
    output_index) only, so it samples the same tokens alone, in any batch, and after recompute.
    """
    if all(p.is_greedy and p.repetition_penalty == 1.0 for p in params):
        return logits.argmax(dim=-1).tolist()  # hot path: plain greedy batch
    penalized = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if penalized:
        logits = logits.clone()
        rows = torch.tensor(penalized, device=logits.device)
        histories = [token_histories[i] for i in penalized]
        logits[rows] = apply_repetition_penalty(
            logits[rows], histories, [params[i].repetition_penalty for i in penalized]
        )
    token_ids = logits.argmax(dim=-1)
    sampling = [i for i, p in enumerate(params) if not p.is_greedy]
    if sampling:
        rows = torch.tensor(sampling, device=logits.device)
        token_ids[rows] = _sample_rows(
            logits[rows], [params[i] for i in sampling], [output_indices[i] for i in sampling]
        )
    return token_ids.tolist()


def apply_repetition_penalty(
    logits: torch.Tensor, token_histories: Sequence[Sequence[int]], penalties: Sequence[float]
) -> torch.Tensor:
    """Penalize every token seen in each row's history as transformers' RepetitionPenaltyLogitsProcessor:
    positive logits are divided by the penalty, negative ones multiplied. Returns new logits [N, V]."""
    num_rows, vocab_size = logits.shape
    width = max(1, max(len(h) for h in token_histories))
    # ids past the vocabulary and the padding go to one extra column, dropped at the end
    rows = [[*h, *[vocab_size] * (width - len(h))] for h in token_histories]
    ids = torch.tensor(rows, dtype=torch.long).to(logits.device).clamp_(max=vocab_size)
    penalty = torch.tensor(penalties, dtype=logits.dtype, device=logits.device)[:, None]
    padded = torch.nn.functional.pad(logits, (0, 1))
    seen = padded.gather(1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, ids, seen)[:, :vocab_size]


def apply_top_k(logits: torch.Tensor, k: int | Sequence[int]) -> torch.Tensor:
    """Mask (-inf) all but the k highest logits of each row, ties kept, as transformers' TopKLogitsWarper.
    k is one value or one per row; k <= 0 leaves the row alone."""
    num_rows, vocab_size = logits.shape
    ks = [k] * num_rows if isinstance(k, int) else list(k)
    kept = [min(x, vocab_size) if x > 0 else 0 for x in ks]
    top = logits.topk(max(1, max(kept)), dim=-1).values
    kth = top.gather(1, torch.tensor([max(1, x) - 1 for x in kept], device=logits.device)[:, None])
    kth = kth.masked_fill(torch.tensor([x == 0 for x in kept], device=logits.device)[:, None], -float("inf"))
    return logits.masked_fill(logits < kth, -float("inf"))


def apply_top_p(logits: torch.Tensor, p: float | Sequence[float]) -> torch.Tensor:
    """Keep each row's smallest set of most probable tokens whose probability adds up to at least p (at
    least one token), as transformers' TopPLogitsWarper; a tie at the cutoff keeps all the tied tokens.
    p is one value or one per row; p >= 1 leaves the row alone."""
    num_rows, vocab_size = logits.shape
    ps = [p] * num_rows if isinstance(p, int | float) else list(p)
    # NOTE: 1 - p in double, then rounded to fp32, as transformers compares against the Python float.
    cutoffs = [1.0 - x if x < 1.0 else -1.0 for x in ps]
    cutoff = torch.tensor(cutoffs, dtype=logits.dtype, device=logits.device)
    ordered = logits.sort(dim=-1).values
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    num_removed = (cumulative <= cutoff[:, None]).sum(dim=-1, keepdim=True).clamp_(max=vocab_size - 1)
    return logits.masked_fill(logits < ordered.gather(1, num_removed), -float("inf"))


def _sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams], output_indices: Sequence[int]):
    # logits: [n, V] of the sampling rows -> token ids [n]
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
    logits = logits / temperature[:, None]
    if any(p.top_k > 0 for p in params):
        logits = apply_top_k(logits, [p.top_k for p in params])
    if any(p.top_p < 1.0 for p in params):
        logits = apply_top_p(logits, [p.top_p for p in params])
    probs = logits.softmax(dim=-1)
    noise = _exponential_noise(probs.shape, params, output_indices, probs.device)
    return (probs / noise).argmax(dim=-1)  # exponential race: a draw from probs


def _exponential_noise(shape, params: Sequence[SamplingParams], output_indices: Sequence[int], device):
    noise = torch.empty(shape, device=device)  # fp32, as the logits
    unseeded = [i for i, p in enumerate(params) if p.seed is None]
    if unseeded:
        block = torch.empty((len(unseeded), shape[1]), device=device)
        noise[torch.tensor(unseeded, device=device)] = block.exponential_(generator=_shared_generator(device))
    for i, p in enumerate(params):
        if p.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(token_seed(p.seed, output_indices[i]))
            noise[i].exponential_(generator=generator)
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # a 0 draw would make 0 / 0 = nan win argmax


def token_seed(seed: int, output_index: int) -> int:
    """The generator seed of a request's output_index-th token (splitmix64 of both)."""
    z = (seed + (output_index + 1) * _GOLDEN64) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _shared_generator(device: torch.device) -> torch.Generator:
    generator = _shared_generators.get(device)
    if generator is None:
        generator = torch.Generator(device=device)
        generator.seed()
        _shared_generators[device] = generator
    return generator
