"""worker.cuda_graphs' decode forward (what a CUDA graph captures), run eagerly on CPU against the eager runner."""

from __future__ import annotations

import random

import pytest
import torch

from worker.cuda_graphs import DecodeGraphs, batch_buckets, next_pow2
from worker.kv_cache import BlockManager
from worker.model.loader import load_model
from worker.model_runner import ModelRunner
from worker.scheduler import Scheduler, SchedulerConfig
from worker.sequence import SamplingParams, Sequence


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert next_pow2(9, 8) == 16 and next_pow2(3, 8) == 8 and next_pow2(64, 8) == 64


def test_needs_cuda_to_capture(tiny_gqa_model_dir):
    model = load_model(tiny_gqa_model_dir)
    with pytest.raises(ValueError):
        DecodeGraphs(model, [], block_size=4, device=torch.device("cpu"), max_num_seqs=8, max_context=64)


def test_cpu_runner_never_builds_graphs(tiny_gqa_model_dir):
    model = load_model(tiny_gqa_model_dir)
    runner = ModelRunner(model, num_blocks=8, block_size=4, dtype=torch.float32, device=torch.device("cpu"),
                         cuda_graphs=True)
    assert runner.graphs is None


@pytest.mark.parametrize("num_seqs", [1, 5])
def test_static_decode_matches_eager_runner(tiny_gqa_model_dir, num_seqs):
    torch.manual_seed(0)
    model = load_model(tiny_gqa_model_dir)
    c = model.config
    bs, num_blocks = 4, 256
    runner = ModelRunner(model, num_blocks=num_blocks, block_size=bs, dtype=torch.float32,
                         device=torch.device("cpu"))
    graphs = DecodeGraphs(model, runner.kv_caches, block_size=bs, device=torch.device("cpu"), max_num_seqs=8,
                          max_context=num_blocks * bs, capture=False)
    scheduler = Scheduler(SchedulerConfig(8, 256, num_blocks * bs), BlockManager(num_blocks, bs, False))
    rng = random.Random(num_seqs)
    for i in range(num_seqs):
        prompt = [1] + [rng.randrange(3, c.vocab_size) for _ in range(rng.randint(3, 40))]
        scheduler.add(Sequence(f"r{i}", prompt, SamplingParams(max_new_tokens=24, ignore_eos=True), frozenset({2})))
    decode_steps = 0
    while scheduler.has_unfinished:
        batch = scheduler.schedule()
        plan = runner._plan(batch)
        key = graphs.bucket(plan)
        if key is None:  # prefill (or mixed) steps: the eager path
            assert any(q != 1 for q in plan.query_lens)
            logits = runner.execute(plan)
        else:
            assert key[0] >= len(plan.query_lens)
            # alternate which path writes the step's KV first: the writes must be idempotent either way
            if decode_steps % 2:
                eager = runner.execute(plan)
                logits = graphs.run(plan)
            else:
                logits = graphs.run(plan)
                eager = runner.execute(plan)
            assert logits.shape == eager.shape
            torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-4)
            decode_steps += 1
        sampling = [e.seq for e in batch.entries if e.is_sampling]
        tokens = logits.argmax(-1).tolist()
        scheduler.update(batch, {s.request_id: t for s, t in zip(sampling, tokens, strict=True)})
    assert decode_steps >= 20
    assert graphs.num_replays == decode_steps
    if num_seqs > 1:  # padded batches, and contexts past 8 blocks of 4 tokens: both context buckets were used
        assert {b for b, _ in graphs.graphs} >= {8} and {m for _, m in graphs.graphs} >= {8, 16}


def test_mixed_and_oversized_steps_fall_back(tiny_gqa_model_dir):
    model = load_model(tiny_gqa_model_dir)
    graphs = DecodeGraphs(model, [], block_size=4, device=torch.device("cpu"), max_num_seqs=4, max_context=64,
                          capture=False)
    from worker.tp.plan import StepPlan

    def plan(query_lens, context_lens, sample_rows=None):
        t = sum(query_lens)
        return StepPlan(torch.zeros(t, dtype=torch.long), torch.zeros(t, dtype=torch.long),
                        torch.zeros(t, dtype=torch.long), query_lens, context_lens,
                        torch.zeros((len(query_lens), 16), dtype=torch.long),
                        torch.arange(len(query_lens)) if sample_rows is None else sample_rows)

    assert graphs.bucket(plan([1, 1, 1], [5, 9, 40])) == (4, 16)
    assert graphs.bucket(plan([1, 4], [5, 9])) is None  # a prefill chunk
    assert graphs.bucket(plan([1] * 5, [5] * 5)) is None  # more sequences than the largest bucket
    assert graphs.bucket(plan([1], [65])) is None  # beyond the context the graphs cover
    assert graphs.bucket(plan([1, 1], [5, 5], torch.tensor([1]))) is None  # a row that does not sample
