"""`--decode-attention flex`: the worker's decode rows read in place from the KV pool with FlexAttention give the
same greedy tokens as transformers and as the gather path, batched with prefill chunks, prefix-cached pages shared
between sequences, and batches that cross a bucket (padding rows)."""

from __future__ import annotations

import pytest

from tests.engine.test_parity import assert_batched_greedy_matches_transformers, random_prompts
from tests.engine_utils import make_worker, run_all
from worker.config import WorkerConfig
from worker.sequence import SamplingParams


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_gqa_model_dir"])
def test_flex_decode_greedy_matches_transformers(fixture, request):
    # 16 prompts, at most 12 at once: batches of 9..12 decode rows run in the 16 bucket, fewer in the 8 one
    assert_batched_greedy_matches_transformers(request.getfixturevalue(fixture), seed=len(fixture), max_num_seqs=12,
                                               decode_attention="flex")


def test_flex_decode_equals_gather_with_shared_prefixes(tiny_model_dir):
    """Sequences sharing cached prefix pages (and one page-aligned context) decode to the gather path's tokens."""
    shared = random_prompts(1024, seed=9)[12]  # 177 tokens: 11 full pages shared, then each prompt's own suffix
    prompts = [shared + [100 + i] * (i % 20) for i in range(10)] + [shared[:160]]  # 160 = 10 full pages
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    outs = {}
    for mode in ("gather", "flex"):
        worker = make_worker(tiny_model_dir, max_num_batched_tokens=128, decode_attention=mode)
        try:
            assert (worker.runner.model.model.flex_decode is not None) == (mode == "flex")
            run_all(worker, [shared], params, prefix="warm")  # its pages are cached before the batch arrives
            results = run_all(worker, prompts, params)
            outs[mode] = [r.token_ids for r in results]
            # (a prompt of whole pages computes its last page again)
            assert all(r.finish.num_cached_tokens >= 144 for r in results)
        finally:
            worker.engine.stop()
    assert outs["flex"] == outs["gather"]


def test_flex_decode_refuses_cuda_graphs(tiny_model_dir):
    with pytest.raises(ValueError, match="decode_attention 'flex' cannot be combined with cuda_graphs"):
        WorkerConfig(model_dir=tiny_model_dir, decode_attention="flex", cuda_graphs=True)
    with pytest.raises(ValueError, match="decode_attention must be one of"):
        WorkerConfig(model_dir=tiny_model_dir, decode_attention="paged")
