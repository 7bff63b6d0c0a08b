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


def models(workers: Iterable[WorkerState]) -> dict[str, int]:
    """Healthy model names mapped to their number of healthy workers (for ListModels), sorted by name."""
    counts = Counter(w.model for w in workers if w.is_healthy)
    return dict(sorted(counts.items()))
