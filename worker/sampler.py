"""Batched next-token sampling with per-request penalties (repetition, presence, frequency), min_new_tokens,
temperature, top-k, top-p and seed."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker.grammar import apply_bitmask
from worker.sequence import SamplingParams, TokenLogprobs

_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15
_shared_generators: dict[torch.device, torch.Generator] = {}


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    token_histories: Sequence[Sequence[int]],
    output_indices: Sequence[int],
    eos_token_ids: Sequence[frozenset[int]] | None = None,
    masks: tuple[list[int], torch.Tensor] | None = None,
) -> list[int]:
    """Pick one token per row of logits [N, V] (fp32).

    token_histories[i] holds row i's prompt + output ids (for the penalties); output_indices[i] counts the tokens
    row i already generated (its last output_indices[i] history ids); eos_token_ids[i] are the ids min_new_tokens
    keeps out. A seeded row draws its randomness from (seed, output_index) only, so it samples the same tokens
    alone, in any batch, and after recompute. masks: (rows, bitmask) of the rows whose grammar allows only some
    tokens next (worker.grammar: one bitmask row per listed row), applied after the penalties.
    """
    if masks is None and all(p.is_greedy and p.plain for p in params):
        return logits.argmax(dim=-1).tolist()  # hot path: plain greedy batch
    raw = logits
    logits = apply_penalties(logits, params, token_histories, output_indices, eos_token_ids)
    if masks is not None:
        if logits is raw:  # (no penalty made a copy: the model's logits stay as they are, for logprobs)
            logits = logits.clone()
        rows = torch.tensor(masks[0], device=logits.device)
        logits[rows] = apply_bitmask(logits[rows], masks[1])
    token_ids = logits.argmax(dim=-1)
    sampling = [i for i, p in enumerate(params) if not p.is_greedy]
    if sampling:
        rows = torch.tensor(sampling, device=logits.device)
        token_ids[rows] = _sample_rows(
            logits[rows], [params[i] for i in sampling], [output_indices[i] for i in sampling]
        )
    return token_ids.tolist()


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int], num_top: Sequence[int]) -> list[TokenLogprobs]:
    """Each row's sampled token's log-probability under its raw logits [N, V] (log-softmax in float32, before any
    penalty, temperature or filter), with its num_top[i] most likely tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logits.device)[:, None])[:, 0].tolist()
    width = max(num_top) if num_top else 0
    if width:
        values, ids = logprobs.topk(width, dim=-1)
        values, ids = values.tolist(), ids.tolist()
    return [TokenLogprobs(t, chosen[i], tuple(zip(ids[i][:n], values[i][:n], strict=True)) if n else ())
            for i, (t, n) in enumerate(zip(token_ids, num_top, strict=True))]


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    token_histories: Sequence[Sequence[int]],
    output_indices: Sequence[int],
    eos_token_ids: Sequence[frozenset[int]] | None = None,
) -> torch.Tensor:
    """The logits each row's parameters modify, in vLLM's order: end-of-sequence masked while min_new_tokens are
    not reached, then the repetition penalty (prompt and output, as transformers applies it), then the frequency
    and presence penalties (output tokens only). Returns the input itself when no row modifies anything."""
    masked = [i for i, p in enumerate(params)
              if output_indices[i] < p.min_new_tokens and eos_token_ids is not None and eos_token_ids[i]]
    repeated = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    counted = [i for i, p in enumerate(params)
               if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and output_indices[i] > 0]
    if not (masked or repeated or counted):
        return logits
    logits = logits.clone()
    for i in masked:
        logits[i, sorted(eos_token_ids[i])] = -float("inf")
    if repeated:
        rows = torch.tensor(repeated, device=logits.device)
        logits[rows] = apply_repetition_penalty(
            logits[rows], [token_histories[i] for i in repeated], [params[i].repetition_penalty for i in repeated]
        )
    if counted:
        rows = torch.tensor(counted, device=logits.device)
        outputs = [token_histories[i][len(token_histories[i]) - output_indices[i]:] for i in counted]
        logits[rows] = apply_output_penalties(
            logits[rows], outputs, [params[i].presence_penalty for i in counted],
            [params[i].frequency_penalty for i in counted]
        )
    return logits


def apply_output_penalties(
    logits: torch.Tensor, outputs: Sequence[Sequence[int]], presence: Sequence[float], frequency: Sequence[float]
) -> torch.Tensor:
    """vLLM's presence and frequency penalties: each token's logit minus frequency times its count in the row's
    output, minus presence once if it occurs there at all. Returns new logits [N, V]."""
    num_rows, vocab_size = logits.shape
    width = max(1, max(len(o) for o in outputs))
    ids = torch.tensor([[*o, *[vocab_size] * (width - len(o))] for o in outputs], dtype=torch.long)
    ids = ids.to(logits.device).clamp_(max=vocab_size)
    counts = torch.zeros((num_rows, vocab_size + 1), dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))
    counts = counts[:, :vocab_size]
    freq = torch.tensor(frequency, dtype=logits.dtype, device=logits.device)[:, None]
    pres = torch.tensor(presence, dtype=logits.dtype, device=logits.device)[:, None]
    return logits - freq * counts - pres * (counts > 0).to(logits.dtype)


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
