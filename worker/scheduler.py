"""Iteration-level continuous batching: each step spends a token budget on running, then waiting sequences."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, replace

from worker.fair_queue import FairQueue, fair_shares
from worker.finish import finish_reason
from worker.kv_cache import BlockManager, CachedPrefix
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

    Tenants (Sequence.tenant, weighted by Sequence.weight) share the replica: waiting sequences are admitted in
    weighted fair order (worker.fair_queue), and a tenant holding fewer running sequences than its share may take a
    slot from one holding more (recompute preemption). With a single tenant this is plain FIFO.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config  # as configured; never changes
        self.limits = config  # the limits in force: lower than config while shedding load (shrink_batch)
        self.block_manager = block_manager
        self.waiting = FairQueue()  # FIFO per tenant; preempted sequences go back to the front of theirs
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
        """End seq now for reason (worker.finish decides it: update() on EOS/length, the engine on a stop string);
        frees its blocks. Idempotent."""
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
        chunk of what budget is left); then waiting sequences in fair order (tenants below their share of
        max_num_seqs first, then by virtual time; FIFO within a tenant) while budget, max_num_seqs and blocks
        allow, nobody jumping a head that does not fit. Running sequences that need blocks preempt others
        (preempt()); a step that preempted so admits nobody (the freed blocks would only be fought over again).
        When room runs out, a waiting tenant below its share of the running set claims room from tenants above
        theirs (_claim_fair_share), and the step that preempted for it admits its sequence.
        """
        budget = self.limits.max_num_batched_tokens
        entries: dict[Sequence, ScheduledSeq] = {}
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            assert num_new_tokens > 0, f"{seq.request_id} has nothing to compute"
            if not self._allocate_or_preempt(seq, num_new_tokens, i, preempted):
                continue  # seq preempted itself; running[i] is now the one after it
            entries[seq] = self._entry(seq, num_new_tokens)
            budget -= num_new_tokens
            i += 1
        if not preempted:
            decoding = list(entries)
            if self._admit(budget, entries, preempted):
                # a tenant below its share just claimed room: its prefill runs in a step of its own, so its first
                # token waits for no one else's tokens (the others lose one step, once per claim)
                for seq in decoding:
                    entries.pop(seq, None)
        if not entries:
            return None
        return ScheduledBatch(tuple(entries.values()), tuple(preempted))

    def update(self, batch: ScheduledBatch, sampled_token_ids: dict[str, int]) -> list[Sequence]:
        """Called after the model step: record computed tokens, append sampled ones, finish the sequences
        worker.finish says are over (EOS, length).

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
            reason = finish_reason(seq, self.config.max_model_len)
            if reason is not None:
                self.finish(seq, reason)
        return updated

    def check_invariants(self) -> None:
        """Assert queue and block bookkeeping agree (tests)."""
        assert len(self.running) <= self.limits.max_num_seqs
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
        self.waiting.check_invariants()
        self.block_manager.check_invariants(self.running)

    def preempt(self, among: list[Sequence] | None = None) -> Sequence:
        """Send one running sequence of `among` (default: all running) back to the front of its tenant's queue
        (recompute); its blocks are freed. The victim: the newest sequence of the tenant furthest above its share
        of the running set, or the newest of `among` when no tenant is above its share."""
        among = self.running if among is None else among
        counts = Counter(s.tenant for s in self.running)
        victim = self._over_share_victim(among, counts, self._shares(len(self.running), counts)) or among[-1]
        self._preempt(victim)
        return victim

    def shrink_batch(self) -> int:
        """Shed load after a model step ran out of memory: preempt the newer half of the running sequences
        (preempt() picks them; recompute) and lower the limits of a step, max_num_seqs to what is left running and
        the token budget to half, until restore_batch() raises them again. Returns the number preempted."""
        keep = max(1, self.num_running // 2)
        num_preempted = 0
        while self.num_running > keep:
            self.preempt()
            num_preempted += 1
        self.limits = replace(self.limits, max_num_seqs=max(1, min(self.limits.max_num_seqs, keep)),
                              max_num_batched_tokens=max(1, self.limits.max_num_batched_tokens // 2))
        return num_preempted

    def restore_batch(self) -> bool:
        """Double the lowered limits back towards the configured ones; False when they are not lowered."""
        if not self.is_batch_shrunk:
            return False
        full, now = self.config, self.limits
        self.limits = replace(now, max_num_seqs=min(full.max_num_seqs, now.max_num_seqs * 2),
                              max_num_batched_tokens=min(full.max_num_batched_tokens, now.max_num_batched_tokens * 2))
        return True

    @property
    def is_batch_shrunk(self) -> bool:
        return self.limits != self.config

    def _allocate_or_preempt(self, seq: Sequence, num_new_tokens: int, first_unplanned: int,
                             preempted: list[Sequence]) -> bool:
        # running[first_unplanned:] (seq first) have no entry this step yet: only they may be evicted for seq
        while not self.block_manager.can_allocate(seq, num_new_tokens):
            victim = self.preempt(self.running[first_unplanned:])
            preempted.append(victim)
            if victim is seq:
                return False
        self.block_manager.allocate(seq, num_new_tokens)
        return True

    def _admit(self, budget: int, entries: dict[Sequence, ScheduledSeq], preempted: list[Sequence]) -> bool:
        """Start waiting sequences while room allows; True when one claimed room by preempting (_claim_fair_share)."""
        counts = Counter(s.tenant for s in self.running)
        shares = self._shares(self.limits.max_num_seqs, counts)
        while self.waiting and budget > 0 and len(self.running) < self.limits.max_num_seqs:
            seq = self.waiting.peek(first=self._below_share(counts, shares))
            prefix = self.block_manager.get_computed_prefix(seq)
            if self._prefix_in_flight(seq, prefix):
                break  # a running sequence is computing this prompt's next block now: admitted once it is cached
            num_new_tokens = min(seq.num_tokens - prefix.num_tokens, budget)
            if not self._fits(seq, num_new_tokens, prefix):
                break
            self._start(seq, num_new_tokens, prefix, entries)
            counts[seq.tenant] += 1
            budget -= num_new_tokens
        if self.waiting and budget > 0:
            return self._claim_fair_share(budget, counts, entries, preempted)
        return False

    def _prefix_in_flight(self, seq: Sequence, prefix: CachedPrefix) -> bool:
        """Whether a running sequence still in its prefill shares seq's prompt up to the block after its cached
        prefix: then seq waits for those blocks instead of computing them a second time (the n completions of one
        prompt, or equal prompts arriving together, prefill it once)."""
        bm = self.block_manager
        if not bm.enable_prefix_caching:
            return False
        end = prefix.num_tokens + bm.block_size  # the next block seq would compute
        if seq.num_prompt_tokens <= end:  # (its last block is never served from the cache: nothing to wait for)
            return False
        head = seq.token_ids[:end]
        return any(other.num_computed_tokens < end <= other.num_prompt_tokens - 1 and other.token_ids[:end] == head
                   for other in self.running)

    def _claim_fair_share(self, budget: int, counts: Counter[str], entries: dict[Sequence, ScheduledSeq],
                          preempted: list[Sequence]) -> bool:
        # Room ran out (slots or blocks). A waiting tenant below its share of the running set as it is now gets
        # its next sequence in, preempting the newest sequences of tenants above their shares if it must. A
        # victim's tenant never drops below its share and the claimant never goes above its own, so slots
        # never trade back and forth; with one tenant nobody is below its share.
        shares = self._shares(len(self.running), counts)
        below = self._below_share(counts, shares)
        if not below:
            return False
        seq = self.waiting.peek(first=below)
        prefix = self.block_manager.get_computed_prefix(seq)
        num_new_tokens = min(seq.num_tokens - prefix.num_tokens, budget)
        victims: list[Sequence] = []
        left = Counter(counts)
        while not self._fits(seq, num_new_tokens, prefix, victims):
            victim = self._over_share_victim([s for s in self.running if s not in victims], left, shares)
            if victim is None:
                return False  # cannot make room: preempt nobody
            victims.append(victim)
            left[victim.tenant] -= 1
        for victim in victims:
            self._preempt(victim)
            entries.pop(victim, None)
            preempted.append(victim)
        self._start(seq, num_new_tokens, prefix, entries)
        return True

    def _shares(self, num_slots: int, counts: Counter[str]) -> dict[str, int]:
        """Each tenant's share of num_slots running sequences; empty when fewer than two tenants have work."""
        weights: dict[str, int] = {}
        for seq in (*self.running, *self.waiting.heads()):
            # a tenant's jobs carry one weight, unless its tier changed while some were in flight: take the largest
            weights[seq.tenant] = max(weights.get(seq.tenant, 1), seq.weight)
        if len(weights) < 2:
            return {}
        return fair_shares(weights, num_slots, counts)

    def _below_share(self, counts: Counter[str], shares: dict[str, int]) -> list[str]:
        return [t for t in self.waiting.tenants if counts[t] < shares.get(t, 0)]

    @staticmethod
    def _over_share_victim(among: list[Sequence], counts: Counter[str], shares: dict[str, int]) -> Sequence | None:
        """The newest sequence of among whose tenant is furthest above its share; None if none is above it."""
        if not shares or not among:
            return None
        victim = max(among, key=lambda s: (counts[s.tenant] - shares[s.tenant], s.arrival))
        return victim if counts[victim.tenant] > shares[victim.tenant] else None

    def _fits(self, seq: Sequence, num_new_tokens: int, prefix: CachedPrefix,
              releasing: Collection[Sequence] = ()) -> bool:
        """Whether seq could be admitted with num_new_tokens once `releasing` (running) were preempted."""
        bm = self.block_manager
        if len(self.running) - len(releasing) >= self.limits.max_num_seqs:
            return False
        if not releasing:
            return bm.can_allocate(seq, num_new_tokens, prefix)
        # can_allocate as it would answer after freeing them: a block they alone hold becomes free (or
        # cached-evictable, which is as good), and a prefix block that drops to no holder must be revived
        held = Counter(b for victim in releasing for b in victim.block_table)
        num_freed = sum(1 for b, n in held.items() if bm.blocks[b].ref_count == n)
        num_revived = sum(1 for b in prefix.block_ids if bm.blocks[b].ref_count == held[b])
        num_new_blocks = max(0, -(-(prefix.num_tokens + num_new_tokens) // bm.block_size) - len(prefix.block_ids))
        return num_new_blocks + num_revived <= bm.num_free_blocks + num_freed

    def _start(self, seq: Sequence, num_new_tokens: int, prefix: CachedPrefix,
               entries: dict[Sequence, ScheduledSeq]) -> None:
        self.waiting.pop(seq)
        self.block_manager.allocate(seq, num_new_tokens, prefix)
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.arrival)
        entries[seq] = self._entry(seq, num_new_tokens)

    def _preempt(self, victim: Sequence) -> None:
        self.running.remove(victim)
        self.block_manager.free(victim)
        victim.num_computed_tokens = 0
        victim.status = SequenceStatus.PREEMPTED
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    @staticmethod
    def _entry(seq: Sequence, num_new_tokens: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return ScheduledSeq(seq, start, num_new_tokens, start + num_new_tokens == seq.num_tokens)
