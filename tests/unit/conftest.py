"""Factories for scheduler and block-manager tests (vLLM style), and a fake runner that checks the KV."""

from __future__ import annotations

import zlib
from collections.abc import Callable

from worker.kv_cache import BlockManager
from worker.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from worker.sequence import SamplingParams, Sequence

EOS = 2


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 16,
                   max_num_batched_tokens: int = 64, max_model_len: int | None = None,
                   enable_prefix_caching: bool = True) -> Scheduler:
    """A scheduler over a fresh pool; max_model_len defaults to the whole pool."""
    config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len or num_blocks * block_size)
    return Scheduler(config, BlockManager(num_blocks, block_size, enable_prefix_caching))


def make_sequences(n: int, num_tokens: int = 10, max_new_tokens: int = 8, *, prefix: list[int] | None = None,
                   ignore_eos: bool = False, id_prefix: str = "r", tenant: str = "", weight: int = 1) -> list[Sequence]:
    """n sequences "{id_prefix}{i}" of `tenant` with num_tokens prompt tokens after an optional shared prefix.

    The tokens derive from the request id: equal ids give equal prompts, different ids share nothing.
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
    seqs = []
    for i in range(n):
        request_id = f"{id_prefix}{i}"
        base = 1000 * (1 + zlib.crc32(request_id.encode()) % 100_000)
        prompt = list(prefix or []) + [base + j for j in range(num_tokens)]
        seqs.append(Sequence(request_id, prompt, params, frozenset({EOS}), tenant=tenant, weight=weight))
    return seqs


def next_token(token_ids: list[int]) -> int:
    """A deterministic stand-in for greedy decoding: depends on the whole context, never EOS."""
    return 3 + (sum(token_ids) * 7 + len(token_ids)) % 97


class FakeRunner:
    """Stands in for the model runner: checks every chunk's context is in its KV slots, then writes them.

    A slot holds the token ids up to and including its position, so a block that was shared, evicted or
    reused wrongly shows up as a mismatch.
    """

    def __init__(self, block_size: int, sample: Callable[[Sequence], int] | None = None):
        self.block_size = block_size
        self.sample = sample or (lambda seq: next_token(seq.token_ids))
        self.kv: dict[int, tuple[int, ...]] = {}
        self.num_computed = 0  # tokens computed over all steps

    def run(self, batch: ScheduledBatch) -> dict[str, int]:
        sampled = {}
        for e in batch.entries:
            seq, end = e.seq, e.start + e.num_new_tokens
            assert e.start == seq.num_computed_tokens and e.num_new_tokens > 0
            assert len(seq.block_table) * self.block_size >= end
            for pos in range(e.start):
                expected = tuple(seq.token_ids[: pos + 1])
                assert self.kv.get(self._slot(seq, pos)) == expected, (seq.request_id, pos)
            for pos in range(e.start, end):
                self.kv[self._slot(seq, pos)] = tuple(seq.token_ids[: pos + 1])
            self.num_computed += e.num_new_tokens
            if e.is_sampling:
                sampled[seq.request_id] = self.sample(seq)
        return sampled

    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size


def step(scheduler: Scheduler, runner: FakeRunner) -> ScheduledBatch | None:
    """One engine step: schedule, run, update, then check every invariant."""
    batch = scheduler.schedule()
    if batch is not None:
        assert batch.num_tokens <= scheduler.config.max_num_batched_tokens
        assert len(batch.entries) <= scheduler.config.max_num_seqs
        scheduler.update(batch, runner.run(batch))
    scheduler.check_invariants()
    return batch


def run_to_completion(
    scheduler: Scheduler, runner: FakeRunner, max_steps: int = 2000
) -> list[ScheduledBatch]:
    """Step until every sequence has finished; returns the batches."""
    batches = []
    while scheduler.has_unfinished:
        batch = step(scheduler, runner)
        assert batch is not None, "unfinished sequences but nothing scheduled"
        batches.append(batch)
        assert len(batches) < max_steps, "no progress"
    return batches
