"""Worker selection for the router: power of two choices over a snapshot of worker load (pure, no I/O)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Weights of load_score; see its docstring.
RUNNING_WEIGHT = 0.5
WAITING_WEIGHT = 1.0
# Block size assumed when a worker's KV capacity in tokens is unknown (kv_capacity_tokens == 0).
DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class WorkerState:
    """One worker replica as the router last saw it.

    `num_in_flight` is live (requests this router has outstanding there); the other load fields come from the
    worker's last `LoadResponse` and `max_num_seqs` / `kv_capacity_tokens` from its `InfoResponse`.
    """

    address: str
    model: str
    is_healthy: bool
    num_in_flight: int
    num_pending_tokens: int
    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_total_blocks: int
    max_num_seqs: int
    # InfoResponse.kv_capacity_tokens; 0 means unknown (then num_total_blocks * DEFAULT_BLOCK_SIZE is assumed).
    kv_capacity_tokens: int = 0

    @property
    def capacity_tokens(self) -> int:
        """KV cache capacity in tokens, at least 1."""
        capacity = self.kv_capacity_tokens or self.num_total_blocks * DEFAULT_BLOCK_SIZE
        return max(capacity, 1)


def load_score(w: WorkerState) -> float:
    """Outstanding work on `w` in units of requests; lower is better.

        score = num_in_flight
              + WAITING_WEIGHT * num_waiting + RUNNING_WEIGHT * num_running
              + max(max_num_seqs, 1) * num_pending_tokens / capacity_tokens

    The first term is live and exact for this router. The reported queue counts cover all routers but are stale and
    overlap with our own in-flight requests, so running ones count half (they already hold a batch slot); waiting ones
    count fully (a new request queues behind them). The token term expresses pending tokens as a fraction of the KV
    cache, scaled so that one full cache of pending work weighs as much as a full batch of `max_num_seqs` requests:
    it separates workers with equal request counts but long prompts or large `max_new_tokens`.
    """
    requests = w.num_in_flight + WAITING_WEIGHT * w.num_waiting + RUNNING_WEIGHT * w.num_running
    tokens = max(w.max_num_seqs, 1) * w.num_pending_tokens / w.capacity_tokens
    return requests + tokens


def candidates(workers: Iterable[WorkerState], model: str, exclude: frozenset[str] = frozenset()) -> list[WorkerState]:
    """Healthy workers serving `model` whose address is not in `exclude`, in input order."""
    return [w for w in workers if w.is_healthy and w.model == model and w.address not in exclude]


def pick(workers: Sequence[WorkerState], model: str, rng: random.Random,
         exclude: frozenset[str] = frozenset()) -> WorkerState | None:
    """Choose a worker for one request to `model` by power of two choices, or None if no worker fits.

    Filters to healthy workers serving `model` (already resolved from the default by the caller) that are not in
    `exclude` (addresses already tried for this request). With two or more candidates, samples two distinct ones
    uniformly with `rng` and returns the one with the lower `load_score` (the first sampled on a tie); with one,
    returns it. Deterministic given the state of `rng`.
    """
    pool = candidates(workers, model, exclude)
    if not pool:
        return None
    if len(pool) == 1:
        return pool[0]
    a, b = rng.sample(pool, 2)
    return b if load_score(b) < load_score(a) else a


# Why a worker was chosen (llamagrid_router_routing_decisions_total{reason}).
CACHE = "cache"  # it holds the longest cached prefix of the prompt, and its load does not outweigh that
SPILL = "spill"  # another worker holds more of the prompt, but is loaded beyond what the cached tokens are worth
LOAD = "load"  # no worker with a known cache holds any of the prompt: load alone decided
NO_VIEW = "no_view"  # no candidate's cache is known (no event stream): load alone decided
STICKY = "sticky"  # a Chat session's worker
REASONS = (CACHE, SPILL, LOAD, NO_VIEW, STICKY)


def pick_cached(workers: Sequence[WorkerState], model: str, rng: random.Random, cached_tokens: dict[str, int],
                affinity_tokens: int, exclude: frozenset[str] = frozenset()) -> tuple[WorkerState | None, str]:
    """Choose a worker for a prompt by expected cached tokens against load, with the reason.

    `cached_tokens`: address -> prompt tokens that worker holds cached, for the workers whose cache is known. Each
    candidate costs

        cost = load_score(w) - cached_tokens(w) / affinity_tokens

    and the cheapest wins (ties broken at random): `affinity_tokens` cached tokens are worth one more request
    outstanding there. A hot prefix therefore stays where it is cached only until that worker's load exceeds
    another's by what the prefix saves; then the next request goes to the other worker, which caches the prefix too
    (a hot prefix ends up on more replicas). Without any cached token anywhere, or without any known cache, this is
    `pick` (power of two choices), so a new prefix lands on a lightly loaded worker at random.
    """
    pool = candidates(workers, model, exclude)
    if not pool:
        return None, LOAD
    if not any(w.address in cached_tokens for w in pool):
        return pick(pool, model, rng), NO_VIEW
    best_cached = max(cached_tokens.get(w.address, 0) for w in pool)
    if best_cached == 0:
        return pick(pool, model, rng), LOAD
    costs = [(load_score(w) - cached_tokens.get(w.address, 0) / affinity_tokens, w) for w in pool]
    lowest = min(c for c, _ in costs)
    chosen = rng.choice([w for c, w in costs if c == lowest])
    return chosen, CACHE if cached_tokens.get(chosen.address, 0) == best_cached else SPILL


def models(workers: Iterable[WorkerState]) -> dict[str, int]:
    """Healthy model names mapped to their number of healthy workers (for ListModels), sorted by name."""
    counts = Counter(w.model for w in workers if w.is_healthy)
    return dict(sorted(counts.items()))
