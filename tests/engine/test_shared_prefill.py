"""Equal prompts arriving together (the n completions of one prompt) prefill it once: the later ones wait for the
first's blocks and take them from the prefix cache, computing only their last partial block."""

from __future__ import annotations

from tests.engine_utils import make_worker, run_all
from worker.sequence import SamplingParams


def test_four_completions_of_one_prompt_prefill_it_once(tiny_model_dir):
    worker = make_worker(tiny_model_dir, max_num_batched_tokens=512, block_size=16)
    try:
        prompt = [1] + [(7 * i) % 900 + 3 for i in range(130)]  # 131 tokens: 8 full blocks and 3 tokens
        params = [SamplingParams(max_new_tokens=8, temperature=1.0, seed=s) for s in range(4)]
        blocks_before = worker.engine.scheduler.block_manager.num_cached_blocks
        results = run_all(worker, [prompt] * 4, params, prefix="n4-")
        cached = sorted(r.finish.num_cached_tokens for r in results)
        assert cached == [0, 128, 128, 128], cached  # the first computed all of it; the others its full blocks
        assert worker.engine.scheduler.block_manager.num_cached_blocks - blocks_before >= 8
        # each its own seeded stream, not the same completion four times
        assert len({tuple(r.token_ids) for r in results}) > 1
    finally:
        worker.engine.stop()
