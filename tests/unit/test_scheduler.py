"""Scheduler: token budget, chunked prefill, decode, preemption, abort, stop conditions, prefix sharing."""

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
