"""Greedy tokens equal transformers' generate() on the same checkpoint, for prompts batched together."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaForCausalLM

from tests.engine_utils import make_worker, run_all
from worker.sequence import SamplingParams

PROMPT_LENGTHS = [1, 2, 3, 5, 8, 13, 16, 17, 31, 64, 89, 120, 177, 233, 280, 300]
MAX_NEW_TOKENS = 24


def random_prompts(vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab_size) for _ in range(n - 1)] for n in PROMPT_LENGTHS]


@torch.inference_mode()
def hf_greedy(model_dir, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)
        outs.append(out[0, len(p):].tolist())
    return outs


def assert_batched_greedy_matches_transformers(model_dir, seed: int, **overrides) -> None:
    """PROMPT_LENGTHS random prompts submitted at once to a worker configured with `overrides`."""
    worker = make_worker(model_dir, max_num_batched_tokens=256, **overrides)
    try:
        prompts = random_prompts(worker.info.vocab_size, seed=seed)
        results = run_all(worker, prompts, SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
    finally:
        worker.engine.stop()
    expected = hf_greedy(model_dir, prompts, MAX_NEW_TOKENS)
    for n, r, e in zip(PROMPT_LENGTHS, results, expected, strict=True):
        assert r.token_ids == e, f"prompt length {n}"


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_gqa_model_dir", "tiny_rope_model_dir"])
def test_batched_greedy_matches_transformers(fixture, request):
    assert_batched_greedy_matches_transformers(request.getfixturevalue(fixture), seed=len(fixture))


def test_preemption_keeps_outputs(tiny_model_dir):
    """A KV pool far too small for the load forces preemption; tokens are unchanged."""
    prompts = random_prompts(1024, seed=5)[8:]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    roomy = make_worker(tiny_model_dir)
    try:
        expected = run_all(roomy, prompts, params)
    finally:
        roomy.engine.stop()
    tight = make_worker(tiny_model_dir, kv_cache_tokens=512, block_size=16, max_num_batched_tokens=128)
    try:
        got = run_all(tight, prompts, params)
        assert tight.engine.scheduler.num_preemptions > 0
        assert tight.engine.scheduler.block_manager.num_free_blocks == tight.layout.num_blocks
    finally:
        tight.engine.stop()
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
