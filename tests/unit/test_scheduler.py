"""Scheduler: token budget, chunked prefill, decode, preemption, abort, stop conditions, prefix sharing, tenants."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.conftest import (
    EOS,
    FakeRunner,
    make_scheduler,
    make_sequences,
    next_token,
    run_to_completion,
    step,
)
from worker.fair_queue import FairQueue, fair_shares
from worker.finish import finish_reason
from worker.scheduler import ScheduledSeq, SchedulerConfig
from worker.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus


def plan(batch) -> list[tuple[str, int, int, bool]]:
    return [(e.seq.request_id, e.start, e.num_new_tokens, e.is_sampling) for e in batch.entries]


def test_config_rejects_non_positive_limits():
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=0, max_num_batched_tokens=8, max_model_len=8)


def test_nothing_to_do_is_none():
    sched = make_scheduler()
    assert sched.schedule() is None and not sched.has_unfinished


def test_admit_prefill_then_decode_until_length():
    sched = make_scheduler()
    runner = FakeRunner(4)
    [seq] = make_sequences(1, num_tokens=10, max_new_tokens=3)
    sched.add(seq)
    assert (sched.num_waiting, sched.num_running) == (1, 0)
    first = sched.schedule()
    assert first.entries == (ScheduledSeq(seq, 0, 10, True),)
    assert sched.update(first, runner.run(first)) == [seq]
    assert (sched.num_waiting, sched.num_running) == (0, 1)
    assert plan(step(sched, runner)) == [("r0", 10, 1, True)]
    assert plan(step(sched, runner)) == [("r0", 11, 1, True)]
    assert seq.finish_reason == FinishReason.LENGTH and seq.num_output_tokens == 3
    assert seq.block_table == [] and sched.block_manager.num_used_blocks == 0
    assert not sched.has_unfinished and sched.schedule() is None


def test_long_prompt_is_chunked_and_samples_only_at_its_end():
    sched = make_scheduler(max_num_batched_tokens=8)
    runner = FakeRunner(4)
    [seq] = make_sequences(1, num_tokens=30, max_new_tokens=2)
    sched.add(seq)
    plans = [plan(b) for b in run_to_completion(sched, runner)]
    assert plans == [
        [("r0", 0, 8, False)],
        [("r0", 8, 8, False)],
        [("r0", 16, 8, False)],
        [("r0", 24, 6, True)],
        [("r0", 30, 1, True)],
    ]


def test_chunked_prefill_does_not_stall_running_decodes():
    sched = make_scheduler(max_num_batched_tokens=8)
    runner = FakeRunner(4)
    [short] = make_sequences(1, num_tokens=4, max_new_tokens=10, id_prefix="short")
    [long] = make_sequences(1, num_tokens=20, max_new_tokens=2, id_prefix="long")
    sched.add(short)
    step(sched, runner)
    sched.add(long)
    plans = [plan(step(sched, runner)) for _ in range(3)]
    assert plans == [
        [("short0", 4, 1, True), ("long0", 0, 7, False)],
        [("short0", 5, 1, True), ("long0", 7, 7, False)],
        [("short0", 6, 1, True), ("long0", 14, 6, True)],
    ]


def test_token_budget_and_max_num_seqs_hold_every_step():
    sched = make_scheduler(num_blocks=32, max_num_seqs=3, max_num_batched_tokens=16)
    runner = FakeRunner(4)
    for seq in make_sequences(10, num_tokens=13, max_new_tokens=5):
        sched.add(seq)
    batches = run_to_completion(sched, runner)  # step() asserts the budget and batch size
    assert max(len(b.entries) for b in batches) == 3
    assert max(b.num_tokens for b in batches) == 16
    assert runner.num_computed == 10 * (13 + 4)


def test_update_returns_only_sequences_that_got_a_token():
    sched = make_scheduler(max_num_batched_tokens=12)
    runner = FakeRunner(4)
    a, b = make_sequences(2, num_tokens=8)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert plan(batch) == [("r0", 0, 8, True), ("r1", 0, 4, False)]
    assert sched.update(batch, runner.run(batch)) == [a]


def test_running_sequence_short_of_blocks_preempts_the_newest():
    sched = make_scheduler(num_blocks=7)
    runner = FakeRunner(4)
    [a] = make_sequences(1, num_tokens=7, max_new_tokens=6, id_prefix="a")
    b, c = make_sequences(2, num_tokens=6, max_new_tokens=6)
    for seq in (a, b, c):
        sched.add(seq)
    for _ in range(3):
        assert step(sched, runner).preempted == ()
    batch = step(sched, runner)  # b needs a third block, none is free: c (newest) goes
    assert batch.preempted == (c,) and plan(batch) == [("a0", 9, 1, True), ("r0", 8, 1, True)]
    assert c.status == SequenceStatus.PREEMPTED and c.num_preemptions == 1 and sched.num_preemptions == 1
    assert c.block_table == [] and c.num_computed_tokens == 0 and sched.waiting[0] is c
    assert c.num_output_tokens == 3
    run_to_completion(sched, runner)
    assert sched.block_manager.num_free_blocks == 7

    roomy = make_scheduler(num_blocks=64)
    [a2] = make_sequences(1, num_tokens=7, max_new_tokens=6, id_prefix="a")
    b2, c2 = make_sequences(2, num_tokens=6, max_new_tokens=6)
    for seq in (a2, b2, c2):
        roomy.add(seq)
    run_to_completion(roomy, FakeRunner(4))
    assert [s.token_ids for s in (a, b, c)] == [s.token_ids for s in (a2, b2, c2)]
    assert roomy.num_preemptions == 0


def test_newest_sequence_short_of_blocks_preempts_itself():
    sched = make_scheduler(num_blocks=4)
    runner = FakeRunner(4)
    [a] = make_sequences(1, num_tokens=6, max_new_tokens=4, id_prefix="a")
    [b] = make_sequences(1, num_tokens=8, max_new_tokens=4, id_prefix="b")
    sched.add(a)
    sched.add(b)
    step(sched, runner)
    batch = step(sched, runner)
    assert batch.preempted == (b,) and plan(batch) == [("a0", 6, 1, True)]
    assert a.status == SequenceStatus.RUNNING and b.status == SequenceStatus.PREEMPTED
    run_to_completion(sched, runner)
    assert b.finish_reason == FinishReason.LENGTH
    assert b.output_token_ids[1] == next_token(b.token_ids[: b.num_prompt_tokens + 1])  # after recompute


def test_waiting_sequences_never_preempt_and_never_skip_the_queue():
    sched = make_scheduler(num_blocks=4)
    runner = FakeRunner(4)
    [a] = make_sequences(1, num_tokens=10, max_new_tokens=2, id_prefix="a")
    [b] = make_sequences(1, num_tokens=10, max_new_tokens=2, id_prefix="b")
    [c] = make_sequences(1, num_tokens=2, max_new_tokens=2, id_prefix="c")
    sched.add(a)
    step(sched, runner)
    sched.add(b)
    sched.add(c)  # would fit the one free block, but b is first
    batch = step(sched, runner)
    assert plan(batch) == [("a0", 10, 1, True)] and batch.preempted == ()
    assert list(sched.waiting) == [b, c] and a.is_finished
    run_to_completion(sched, runner)
    assert sched.num_preemptions == 0


def test_abort_frees_blocks_at_once_wherever_the_sequence_is():
    sched = make_scheduler(num_blocks=8, max_num_seqs=1)
    runner = FakeRunner(4)
    a, b = make_sequences(2, num_tokens=10)
    sched.add(a)
    sched.add(b)
    step(sched, runner)
    assert sched.block_manager.num_used_blocks == 3
    assert sched.abort("r0") is a
    assert a.status == SequenceStatus.FINISHED and a.finish_reason == FinishReason.CANCELLED
    assert a.block_table == [] and sched.block_manager.num_used_blocks == 0
    assert sched.abort("r1") is b and b.finish_reason == FinishReason.CANCELLED
    assert sched.abort("r1") is None and sched.abort("nope") is None
    assert not sched.has_unfinished
    sched.check_invariants()


def test_abort_between_schedule_and_update_is_skipped():
    sched = make_scheduler()
    runner = FakeRunner(4)
    a, b = make_sequences(2)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    sampled = runner.run(batch)
    sched.abort("r0")
    assert sched.update(batch, sampled) == [b]
    sched.check_invariants()


def eos_after(n: int):
    return lambda seq: EOS if seq.num_output_tokens == n else 7


def test_eos_finishes_and_is_the_last_output():
    sched = make_scheduler()
    [seq] = make_sequences(1, max_new_tokens=10)
    sched.add(seq)
    run_to_completion(sched, FakeRunner(4, eos_after(2)))
    assert seq.finish_reason == FinishReason.EOS and seq.output_token_ids == [7, 7, EOS]
    assert sched.block_manager.num_used_blocks == 0


def test_ignore_eos_runs_to_max_new_tokens():
    sched = make_scheduler()
    [seq] = make_sequences(1, max_new_tokens=5, ignore_eos=True)
    sched.add(seq)
    run_to_completion(sched, FakeRunner(4, eos_after(2)))
    assert seq.finish_reason == FinishReason.LENGTH and seq.output_token_ids == [7, 7, EOS, 7, 7]


def test_finish_from_outside_frees_blocks():
    sched = make_scheduler()
    runner = FakeRunner(4)
    [seq] = make_sequences(1)
    sched.add(seq)
    [got] = sched.update(batch := sched.schedule(), runner.run(batch))
    sched.finish(got, FinishReason.STOP)
    sched.finish(got, FinishReason.LENGTH)  # already finished: no-op
    assert seq.finish_reason == FinishReason.STOP and sched.block_manager.num_used_blocks == 0
    assert not sched.has_unfinished and sched.schedule() is None


def test_finish_reason_is_one_rule_in_a_fixed_order():
    seq = Sequence("f", [1, 5, 6], SamplingParams(max_new_tokens=3), frozenset({EOS}))
    assert finish_reason(seq, 100) is None  # nothing generated yet
    seq.append_token(7)
    assert finish_reason(seq, 100) is None
    assert finish_reason(seq, 100, stop_string_seen=True) == FinishReason.STOP
    assert finish_reason(seq, 4) == FinishReason.LENGTH  # the context is full
    seq.append_token(EOS)
    assert finish_reason(seq, 100, stop_string_seen=True) == FinishReason.EOS  # EOS first
    ignoring = Sequence("g", [1], SamplingParams(max_new_tokens=2, ignore_eos=True), frozenset({EOS}))
    ignoring.append_token(EOS)
    assert finish_reason(ignoring, 100) is None
    ignoring.append_token(EOS)
    assert finish_reason(ignoring, 100, stop_string_seen=True) == FinishReason.LENGTH  # length before stop


def test_shrink_batch_preempts_the_newer_half_and_restore_batch_doubles_back():
    sched = make_scheduler(max_num_seqs=8, max_num_batched_tokens=64)
    configured = sched.config
    runner = FakeRunner(4)
    for seq in make_sequences(6, num_tokens=4, max_new_tokens=40, ignore_eos=True):
        sched.add(seq)
    step(sched, runner)
    assert sched.num_running == 6 and not sched.is_batch_shrunk
    assert sched.shrink_batch() == 3
    assert [s.request_id for s in sched.running] == ["r0", "r1", "r2"]
    assert [s.request_id for s in sched.waiting] == ["r3", "r4", "r5"]
    assert (sched.limits.max_num_seqs, sched.limits.max_num_batched_tokens) == (3, 32) and sched.is_batch_shrunk
    assert sched.config == configured
    batch = step(sched, runner)
    assert len(batch.entries) == 3 and sched.num_running == 3  # nobody admitted past the lowered limit
    assert sched.restore_batch() and (sched.limits.max_num_seqs, sched.limits.max_num_batched_tokens) == (6, 64)
    assert sched.restore_batch() and sched.limits == configured and not sched.is_batch_shrunk
    assert not sched.restore_batch()
    run_to_completion(sched, runner)
    assert sched.block_manager.num_used_blocks == 0


def test_same_system_prompt_shares_blocks():
    sched = make_scheduler()
    runner = FakeRunner(4)
    system = list(range(500, 512))  # three full blocks
    a, b = make_sequences(2, num_tokens=3, prefix=system)
    sched.add(a)
    step(sched, runner)
    sched.add(b)
    batch = step(sched, runner)
    assert plan(batch) == [("r0", 15, 1, True), ("r1", 12, 3, True)]
    assert b.num_cached_tokens == 12 and b.block_table[:3] == a.block_table[:3]
    bm = sched.block_manager
    assert [bm.blocks[i].ref_count for i in b.block_table] == [2, 2, 2, 1]
    run_to_completion(sched, runner)
    assert bm.num_used_blocks == 0


def test_turn_two_reuses_every_full_block_of_turn_one():
    sched = make_scheduler()
    runner = FakeRunner(4)
    [turn1] = make_sequences(1, num_tokens=10, max_new_tokens=7)
    sched.add(turn1)
    run_to_completion(sched, runner)
    assert turn1.num_tokens == 17  # 16 computed: four full blocks cached
    turn2 = Sequence("turn2", turn1.token_ids + [900, 901, 902], SamplingParams(max_new_tokens=2))
    sched.add(turn2)
    assert plan(step(sched, runner)) == [("turn2", 16, 4, True)]
    assert turn2.num_cached_tokens == 16


def test_cached_blocks_are_evicted_under_pressure_tail_first():
    sched = make_scheduler(num_blocks=8)
    runner = FakeRunner(4)
    [a] = make_sequences(1, num_tokens=16, max_new_tokens=1, id_prefix="a")
    sched.add(a)
    run_to_completion(sched, runner)
    assert sched.block_manager.num_cached_blocks == 4
    [big] = make_sequences(1, num_tokens=28, max_new_tokens=1, id_prefix="big")
    sched.add(big)
    run_to_completion(sched, runner)  # 4 free blocks, then 3 of a's evicted
    [again] = make_sequences(1, num_tokens=16, max_new_tokens=1, id_prefix="a")
    sched.add(again)
    assert plan(step(sched, runner)) == [("a0", 4, 12, True)]


def test_prefix_caching_off_computes_everything():
    sched = make_scheduler(enable_prefix_caching=False)
    runner = FakeRunner(4)
    a, b = make_sequences(2, num_tokens=3, prefix=list(range(500, 512)))
    sched.add(a)
    step(sched, runner)
    sched.add(b)
    assert plan(step(sched, runner))[1] == ("r1", 0, 15, True)


# --- property: any interleaving of add / step / abort / stop ends with every block free --------------------

def fake_sample(tokens: list[int]) -> int:
    """Pseudo-random next token from the whole context: a small alphabet, EOS now and then."""
    h = (sum((i + 1) * t for i, t in enumerate(tokens)) * 2654435761) % 2**32
    return EOS if h % 13 == 0 else 3 + h % 4


def generate(prompt: list[int], params: SamplingParams) -> list[int]:
    tokens = list(prompt)
    while len(tokens) - len(prompt) < params.max_new_tokens:
        tokens.append(fake_sample(tokens))
        if tokens[-1] == EOS and not params.ignore_eos:
            break
    return tokens[len(prompt):]


SYSTEM_PROMPTS = ([], [3, 4, 5, 3, 4, 5, 3, 4], [5] * 12)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from(SYSTEM_PROMPTS),
                  st.lists(st.integers(3, 5), min_size=1, max_size=16), st.integers(1, 12), st.booleans()),
        st.tuples(st.just("turn"), st.integers(0, 50), st.lists(st.integers(3, 5), min_size=1, max_size=6)),
        st.tuples(st.just("step"), st.integers(1, 4)),
        st.tuples(st.just("abort"), st.integers(0, 50)),
        st.tuples(st.just("stop"), st.integers(0, 50)),
    ),
    min_size=5,
    max_size=40,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_blocks=st.integers(4, 16), block_size=st.sampled_from([1, 2, 4]), max_num_seqs=st.integers(1, 5),
       budget=st.integers(1, 24), prefix_caching=st.booleans(), ops=ops)
def test_random_interleavings_keep_invariants_and_free_every_block(num_blocks, block_size, max_num_seqs,
                                                                   budget, prefix_caching, ops):
    sched = make_scheduler(num_blocks, block_size, max_num_seqs, budget, enable_prefix_caching=prefix_caching)
    runner = FakeRunner(block_size, lambda seq: fake_sample(seq.token_ids))
    max_len = num_blocks * block_size
    seqs: list[Sequence] = []
    ended_early: set[str] = set()

    def add(prompt: list[int], max_new: int, ignore_eos: bool = False) -> None:
        prompt = prompt[: max_len - 1]
        max_new = max(1, min(max_new, max_len - len(prompt)))  # the engine's clamp
        params = SamplingParams(max_new_tokens=max_new, ignore_eos=ignore_eos)
        seqs.append(Sequence(f"s{len(seqs)}", prompt, params, frozenset({EOS})))
        sched.add(seqs[-1])

    for op in ops:
        if op[0] == "add":
            add(op[1] + op[2], op[3], op[4])
        elif op[0] == "turn" and seqs:
            add(seqs[op[1] % len(seqs)].token_ids + op[2], 4)
        elif op[0] == "step":
            for _ in range(op[1]):
                step(sched, runner)
        elif op[0] in ("abort", "stop") and seqs:
            seq = seqs[op[1] % len(seqs)]
            if op[0] == "abort":
                sched.abort(seq.request_id)
            elif seq.status == SequenceStatus.RUNNING:
                sched.finish(seq, FinishReason.STOP)
            ended_early.add(seq.request_id)
        sched.check_invariants()
    run_to_completion(sched, runner)

    bm = sched.block_manager
    assert bm.num_free_blocks == num_blocks and bm.num_used_blocks == 0
    bm.check_invariants([])
    for seq in seqs:
        assert seq.is_finished and not seq.block_table
        expected = generate(seq.prompt_token_ids, seq.params)
        if seq.request_id in ended_early:
            assert seq.output_token_ids == expected[: seq.num_output_tokens]
        else:
            assert seq.output_token_ids == expected  # preemption and prefix hits change nothing
            eos = expected[-1] == EOS and not seq.params.ignore_eos
            want = FinishReason.EOS if eos else FinishReason.LENGTH
            assert seq.finish_reason == want


# --- tenants: fair admission and fair shares of the running set ---------------------------------------------------

def admitted(batches) -> list[str]:
    """Request ids in the order their first chunk was scheduled."""
    seen: list[str] = []
    for batch in batches:
        seen += [e.seq.request_id for e in batch.entries if e.start == e.seq.num_cached_tokens
                 and e.seq.request_id not in seen]
    return seen


def test_tenants_with_a_backlog_take_turns():
    sched = make_scheduler(max_num_batched_tokens=16)  # two 8-token prompts a step
    for seq in (*make_sequences(4, 8, 1, id_prefix="a", tenant="A"), *make_sequences(4, 8, 1, id_prefix="b",
                                                                                     tenant="B")):
        sched.add(seq)
    assert admitted(run_to_completion(sched, FakeRunner(4))) == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3"]


def test_weights_set_the_admission_ratio_under_a_sustained_backlog():
    sched = make_scheduler(num_blocks=128, max_num_seqs=32, max_num_batched_tokens=40)  # five 8-token prompts a step
    pro = make_sequences(40, 8, 1, id_prefix="pro", tenant="pro", weight=4)
    free = make_sequences(40, 8, 1, id_prefix="free", tenant="free", weight=1)
    for seq in (*free, *pro):
        sched.add(seq)
    runner = FakeRunner(4)
    order = admitted(step(sched, runner) for _ in range(8))
    assert len(order) == 40
    assert sum(r.startswith("pro") for r in order) == 32  # 4:1
    for k in range(0, 40, 5):  # and steadily so, not in bursts
        assert sum(r.startswith("free") for r in order[k:k + 5]) == 1
    run_to_completion(sched, runner)


def test_a_newcomer_is_admitted_ahead_of_a_flooders_backlog():
    sched = make_scheduler(num_blocks=128, max_num_seqs=16, max_num_batched_tokens=16)
    runner = FakeRunner(4)
    for seq in make_sequences(20, 8, 20, id_prefix="f", tenant="flood"):
        sched.add(seq)
    step(sched, runner)
    step(sched, runner)
    [newcomer] = make_sequences(1, 8, 4, id_prefix="n", tenant="newcomer")
    sched.add(newcomer)
    batch = step(sched, runner)
    assert [e.seq for e in batch.entries if e.start == 0][0] is newcomer  # its first admission this step
    assert sched.num_waiting == 20 - 4 - 1 and sched.num_preemptions == 0


def test_fair_share_preempts_a_flooder_for_a_starved_tenant_and_results_are_unchanged():
    sched = make_scheduler(max_num_seqs=4)
    runner = FakeRunner(4)
    flood = make_sequences(8, 6, 6, id_prefix="f", tenant="flood")
    for seq in flood:
        sched.add(seq)
    step(sched, runner)
    step(sched, runner)
    assert sched.running == flood[:4]
    [newcomer] = make_sequences(1, 6, 6, id_prefix="n", tenant="newcomer")
    sched.add(newcomer)
    batch = step(sched, runner)
    assert batch.preempted == (flood[3],)  # the flooder's newest
    assert plan(batch) == [("n0", 0, 6, True)]  # its prefill in a step of its own: its first token waits for no one
    computed = [s.num_computed_tokens for s in flood[:3]]
    batch = step(sched, runner)
    assert [e.seq for e in batch.entries] == [*flood[:3], newcomer]  # the others' decodes resume the next step
    assert [s.num_computed_tokens for s in flood[:3]] == [c + 1 for c in computed]
    assert flood[3].status == SequenceStatus.PREEMPTED and sched.waiting[0] is flood[3]  # first again in its queue
    run_to_completion(sched, runner)
    assert sched.num_preemptions == 1  # the flooder's slots came back as it drained: no trading back and forth

    roomy = make_scheduler(max_num_seqs=16)
    again = [*make_sequences(8, 6, 6, id_prefix="f"), *make_sequences(1, 6, 6, id_prefix="n")]
    for seq in again:
        roomy.add(seq)
    run_to_completion(roomy, FakeRunner(4))
    assert [s.token_ids for s in (*flood, newcomer)] == [s.token_ids for s in again]


def test_fair_share_claims_kv_blocks_when_they_run_out_before_slots():
    sched = make_scheduler(num_blocks=9, max_num_seqs=8)
    runner = FakeRunner(4)
    flood = make_sequences(4, 9, 3, id_prefix="f", tenant="flood")  # 3 blocks each, all their lives
    for seq in flood:
        sched.add(seq)
    step(sched, runner)
    assert sched.running == flood[:3] and sched.block_manager.num_free_blocks == 0
    [newcomer] = make_sequences(1, 5, 3, id_prefix="n", tenant="newcomer")
    sched.add(newcomer)
    batch = step(sched, runner)
    assert batch.preempted == (flood[2],)
    assert plan(batch) == [("n0", 0, 5, True)]
    assert plan(step(sched, runner)) == [("f0", 9, 1, True), ("f1", 9, 1, True), ("n0", 5, 1, True)]
    run_to_completion(sched, runner)
    assert all(s.finish_reason == FinishReason.LENGTH for s in (*flood, newcomer))
    assert flood[2].output_token_ids[1] == next_token(flood[2].token_ids[: flood[2].num_prompt_tokens + 1])


def test_no_preemption_while_every_tenant_is_within_its_share():
    sched = make_scheduler(max_num_seqs=4)
    runner = FakeRunner(4)
    a = make_sequences(6, 6, 3, id_prefix="a", tenant="A")
    b = make_sequences(6, 6, 9, id_prefix="b", tenant="B")
    for x, y in zip(a, b, strict=True):
        sched.add(x)
        sched.add(y)
    batches = run_to_completion(sched, runner)
    assert sched.num_preemptions == 0 and all(not batch.preempted for batch in batches)
    assert max(sum(e.seq.tenant == "A" for e in batch.entries) for batch in batches) == 2


def test_three_tenants_on_four_slots_settle_without_trading_slots():
    sched = make_scheduler(max_num_seqs=4)
    runner = FakeRunner(4)
    a = make_sequences(4, 6, 20, id_prefix="a", tenant="A")
    for seq in a:
        sched.add(seq)
    step(sched, runner)
    for seq in (*make_sequences(2, 6, 20, id_prefix="b", tenant="B"),
                *make_sequences(2, 6, 20, id_prefix="c", tenant="C")):
        sched.add(seq)
    assert step(sched, runner).preempted == (a[3],)  # one claim a step: B's first
    assert step(sched, runner).preempted == (a[2],)  # then C's
    for _ in range(10):
        assert step(sched, runner).preempted == ()
    assert sorted(s.request_id for s in sched.running) == ["a0", "a1", "b0", "c0"]
    run_to_completion(sched, runner)
    assert sched.num_preemptions == 2


def test_a_weighted_tenant_keeps_its_larger_share():
    sched = make_scheduler(max_num_seqs=4)
    runner = FakeRunner(4)
    pro = make_sequences(6, 6, 20, id_prefix="p", tenant="pro", weight=4)
    for seq in pro:
        sched.add(seq)
    step(sched, runner)
    sched.add(make_sequences(1, 6, 20, id_prefix="f", tenant="free")[0])
    assert step(sched, runner).preempted == (pro[3],)  # free's 0.8 of 4 slots rounds up to one
    for _ in range(5):
        assert step(sched, runner).preempted == ()
    assert sorted(s.request_id for s in sched.running) == ["f0", "p0", "p1", "p2"]


def test_kv_pressure_preempts_from_the_tenant_above_its_share_first():
    sched = make_scheduler(num_blocks=8)
    runner = FakeRunner(4)
    a = make_sequences(3, 8, 4, id_prefix="a", tenant="A")  # two full blocks each: the next token needs a third
    for seq in a:
        sched.add(seq)
    [b] = make_sequences(1, 5, 3, id_prefix="b", tenant="B")  # the newest, but B holds less than its share
    sched.add(b)
    step(sched, runner)
    batch = step(sched, runner)
    assert batch.preempted == (a[2],) and b.status == SequenceStatus.RUNNING
    run_to_completion(sched, runner)


def test_an_idle_tenant_rejoins_at_the_clock_and_banks_no_credit():
    queue = FairQueue()
    for seq in (*make_sequences(1, id_prefix="z", tenant="B"), *make_sequences(10, id_prefix="a", tenant="A")):
        queue.append(seq)
    while queue:
        queue.pop(queue.peek())  # B once, then A alone: A's virtual time runs ahead to 10, B's stays at 1
    for seq in (*make_sequences(4, id_prefix="b", tenant="B"), *make_sequences(4, id_prefix="c", tenant="A")):
        queue.append(seq)
    order = []
    while queue:
        order.append(queue.peek().request_id)
        queue.pop(queue.peek())
        queue.check_invariants()
    # B idled meanwhile: it rejoins where A is, not 8 admissions behind, so it cannot take 8 in a row
    assert order == ["b0", "b1", "c0", "b2", "c1", "b3", "c2", "c3"]


def test_fair_shares_are_whole_slots_by_weight():
    assert fair_shares({"pro": 4, "free": 1}, 64, {}) == {"pro": 51, "free": 13}
    assert fair_shares({"pro": 4, "free": 1}, 4, {}) == {"pro": 3, "free": 1}
    assert fair_shares({"a": 1, "b": 1, "c": 1}, 4, {"b": 2, "c": 1}) == {"a": 1, "b": 2, "c": 1}  # ties: holders
    shares = fair_shares({f"t{i}": 1 + i % 3 for i in range(7)}, 5, {"t6": 1})
    assert sum(shares.values()) == 5 and min(shares.values()) >= 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_blocks=st.integers(4, 16), block_size=st.sampled_from([1, 2, 4]), max_num_seqs=st.integers(1, 5),
       budget=st.integers(1, 24), ops=st.lists(st.one_of(
           st.tuples(st.just("add"), st.sampled_from(["A", "B", "C"]), st.sampled_from([1, 4]),
                     st.lists(st.integers(3, 5), min_size=1, max_size=16), st.integers(1, 12)),
           st.tuples(st.just("step"), st.integers(1, 4)),
           st.tuples(st.just("abort"), st.integers(0, 50))), min_size=5, max_size=40))
def test_random_tenants_keep_invariants_and_outputs(num_blocks, block_size, max_num_seqs, budget, ops):
    sched = make_scheduler(num_blocks, block_size, max_num_seqs, budget)
    runner = FakeRunner(block_size, lambda seq: fake_sample(seq.token_ids))
    max_len = num_blocks * block_size
    seqs: list[Sequence] = []
    aborted: set[str] = set()
    for op in ops:
        if op[0] == "add":
            prompt = op[3][: max_len - 1]
            params = SamplingParams(max_new_tokens=max(1, min(op[4], max_len - len(prompt))))
            seqs.append(Sequence(f"s{len(seqs)}", prompt, params, frozenset({EOS}), tenant=op[1], weight=op[2]))
            sched.add(seqs[-1])
        elif op[0] == "step":
            for _ in range(op[1]):
                step(sched, runner)
        elif seqs:
            aborted.add(seqs[op[1] % len(seqs)].request_id)
            sched.abort(seqs[op[1] % len(seqs)].request_id)
    run_to_completion(sched, runner)
    assert sched.block_manager.num_free_blocks == num_blocks
    for seq in seqs:
        expected = generate(seq.prompt_token_ids, seq.params)
        got = seq.output_token_ids
        assert got == (expected[: len(got)] if seq.request_id in aborted else expected)
