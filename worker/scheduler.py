"""Iteration-level continuous batching: each step spends a token budget on running, then waiting sequences."""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from worker.kv_cache import BlockManager
from worker.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int  # sequences running at once
    max_num_batched_tokens: int  # token budget of one step
    max_model_len: int  # prompt + generated tokens of one sequence

    def __post_init__(self) -> None:
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len) <= 0:
            raise ValueError(f"scheduler limits must be positive: {self}")


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """Compute seq.token_ids[start : start + num_new_tokens]; sample a next token when is_sampling."""

    seq: Sequence
    start: int  # == seq.num_computed_tokens when scheduled
    num_new_tokens: int
    is_sampling: bool  # the chunk reaches the end of seq.token_ids


@dataclass(frozen=True, slots=True)
class ScheduledBatch:
    """The plan of one engine step: built by schedule(), read by the model runner, then by update()."""

    entries: tuple[ScheduledSeq, ...]
    preempted: tuple[Sequence, ...] = ()  # sent back to waiting this step; their blocks are already free

    @property
    def num_tokens(self) -> int:
        return sum(e.num_new_tokens for e in self.entries)


class Scheduler:
    """Decides which tokens of which sequences the next step computes; owns the waiting and running queues.

    Called only from the engine thread: add/abort/finish between steps, then schedule -> run -> update.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()  # FIFO; preempted sequences go back to the front
        self.running: list[Sequence] = []  # oldest arrival first
        self.num_preemptions = 0  # total since start

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; the engine has clamped prompt + max_new_tokens to max_model_len."""
        assert seq.status == SequenceStatus.WAITING and not seq.block_table
        assert seq.num_prompt_tokens + seq.params.max_new_tokens <= self.config.max_model_len
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Cancel a request wherever it is; its blocks are free on return. None if it is not here."""
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                self.finish(seq, FinishReason.CANCELLED)
                return seq
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End seq now (update() on EOS/length, the engine on a stop string); frees its blocks. Idempotent."""
        if seq.is_finished:
            return
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def schedule(self) -> ScheduledBatch | None:
        """Called at the start of each engine step: plan the tokens to compute, or None when there are none.

        Running sequences come first, oldest first (a decode costs 1 token, an unfinished prefill gets a
        chunk of what budget is left); then waiting sequences FIFO while budget, max_num_seqs and blocks
        allow. Running sequences that need blocks preempt the newest ones; waiting ones never preempt,
        and a step that preempted admits nobody (the freed blocks would only be fought over again).
        """
        budget = self.config.max_num_batched_tokens
        entries: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            assert num_new_tokens > 0, f"{seq.request_id} has nothing to compute"
            if not self._allocate_or_preempt(seq, num_new_tokens, preempted):
                break  # seq was the newest and preempted itself
            entries.append(self._entry(seq, num_new_tokens))
            budget -= num_new_tokens
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            seq = self.waiting[0]
            prefix = self.block_manager.get_computed_prefix(seq)
            num_new_tokens = min(seq.num_tokens - prefix.num_tokens, budget)
            if not self.block_manager.can_allocate(seq, num_new_tokens, prefix):
                break  # FIFO: nobody behind it jumps the queue
            self.waiting.popleft()
            self.block_manager.allocate(seq, num_new_tokens, prefix)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            entries.append(self._entry(seq, num_new_tokens))
            budget -= num_new_tokens
        if not entries:
            return None
        return ScheduledBatch(tuple(entries), tuple(preempted))

    def update(self, batch: ScheduledBatch, sampled_token_ids: dict[str, int]) -> list[Sequence]:
        """Called after the model step: record computed tokens, append sampled ones, finish EOS/length.

        Returns the sequences that received a new token this step, finished ones included; finished
        sequences have already released their blocks.
        """
        updated: list[Sequence] = []
        for entry in batch.entries:
            seq = entry.seq
            if seq.is_finished:  # aborted after schedule()
                continue
            assert seq.num_computed_tokens == entry.start, f"{seq.request_id} changed since schedule()"
            seq.num_computed_tokens += entry.num_new_tokens
            self.block_manager.register_full_blocks(seq)
            if not entry.is_sampling:
                continue
            token_id = sampled_token_ids[seq.request_id]
            seq.append_token(token_id)
            updated.append(seq)
            reason = self._stop_reason(seq, token_id)
            if reason is not None:
                self.finish(seq, reason)
        return updated

    def check_invariants(self) -> None:
        """Assert queue and block bookkeeping agree (tests)."""
        assert len(self.running) <= self.config.max_num_seqs
        assert not set(self.running) & set(self.waiting)
        assert [s.arrival for s in self.running] == sorted(s.arrival for s in self.running)
        bs = self.block_manager.block_size
        for seq in self.running:
            assert seq.status == SequenceStatus.RUNNING
            assert seq.num_computed_tokens < seq.num_tokens <= self.config.max_model_len
            assert len(seq.block_table) * bs >= seq.num_computed_tokens
        for seq in self.waiting:
            assert seq.status in (SequenceStatus.WAITING, SequenceStatus.PREEMPTED)
            assert not seq.block_table and seq.num_computed_tokens == 0
        self.block_manager.check_invariants(self.running)

    def _allocate_or_preempt(self, seq: Sequence, num_new_tokens: int, preempted: list[Sequence]) -> bool:
        # the one place that decides preemption: evict the newest running sequence until seq fits
        while not self.block_manager.can_allocate(seq, num_new_tokens):
            victim = self.preempt_newest()
            preempted.append(victim)
            if victim is seq:
                return False
        self.block_manager.allocate(seq, num_new_tokens)
        return True

    def preempt_newest(self) -> Sequence:
        """Send the newest running sequence back to the front of waiting (recompute); its blocks are freed."""
        victim = self.running.pop()
        self.block_manager.free(victim)
        victim.num_computed_tokens = 0
        victim.status = SequenceStatus.PREEMPTED
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    @staticmethod
    def _entry(seq: Sequence, num_new_tokens: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return ScheduledSeq(seq, start, num_new_tokens, start + num_new_tokens == seq.num_tokens)

    @staticmethod
    def _stop_reason(seq: Sequence, token_id: int) -> FinishReason | None:
        if token_id in seq.eos_token_ids and not seq.params.ignore_eos:
            return FinishReason.EOS
        if seq.num_output_tokens >= seq.params.max_new_tokens:
            return FinishReason.LENGTH
        return None
