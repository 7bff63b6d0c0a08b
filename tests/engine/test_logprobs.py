"""Logprobs from the engine, batched, greedy and sampled: each token's equals transformers' log-softmax of the same
checkpoint's logits at its position within 1e-4 (float32), and the most likely tokens are transformers' top-k."""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from tests.engine.test_parity import random_prompts
from tests.engine_utils import make_worker, run_all
from worker.sequence import SamplingParams

PARAMS = [SamplingParams(max_new_tokens=12, logprobs=5),
          SamplingParams(max_new_tokens=12, temperature=0.9, seed=11, logprobs=20, ignore_eos=True),
          SamplingParams(max_new_tokens=12, frequency_penalty=1.0, logprobs=0),
          SamplingParams(max_new_tokens=12)]


def test_logprobs_match_transformers_log_softmax(tiny_model_dir):
    worker = make_worker(tiny_model_dir, max_num_batched_tokens=256)
    try:
        prompts = random_prompts(worker.info.vocab_size, seed=9)[5:5 + len(PARAMS)]
        results = run_all(worker, prompts, PARAMS)
    finally:
        worker.engine.stop()
    model = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    for prompt, params, r in zip(prompts, PARAMS, results, strict=True):
        if params.logprobs is None:
            assert r.logprobs == []
            continue
        assert [lp.token_id for lp in r.logprobs] == r.token_ids
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + r.token_ids])).logits[0, len(prompt) - 1:-1]
        expected = torch.log_softmax(logits.float(), dim=-1)
        for j, lp in enumerate(r.logprobs):
            assert abs(lp.logprob - expected[j, lp.token_id].item()) <= 1e-4, (params, j)
            assert len(lp.top) == params.logprobs
            if params.logprobs:
                values, ids = expected[j].topk(params.logprobs)
                assert [t for t, _ in lp.top] == ids.tolist()
                assert max(abs(v - w) for (_, v), w in zip(lp.top, values.tolist(), strict=True)) <= 1e-4
