"""Presence and frequency penalties and min_new_tokens in the engine, batched with other requests, against
transformers' generate() on the same checkpoint: its own MinNewTokensLengthLogitsProcessor, and vLLM's penalty
formula (which transformers has no processor for) as a logits processor of its own."""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from tests.engine.test_parity import random_prompts
from tests.engine_utils import make_worker, run_all
from worker.sequence import SamplingParams

MAX_NEW = 20


class OutputPenalties(LogitsProcessor):
    """vLLM's presence and frequency penalties over the tokens generated after the prompt."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = input_ids[:, self.prompt_length:]
        counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


@torch.inference_mode()
def hf_greedy(model_dir, prompt: list[int], params: SamplingParams) -> list[int]:
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    processors = LogitsProcessorList([OutputPenalties(len(prompt), params.presence_penalty,
                                                      params.frequency_penalty)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_new_tokens,
                         min_new_tokens=params.min_new_tokens or None, do_sample=False, pad_token_id=0,
                         logits_processor=processors)
    return out[0, len(prompt):].tolist()


PARAMS = [SamplingParams(max_new_tokens=MAX_NEW, presence_penalty=1.5),
          SamplingParams(max_new_tokens=MAX_NEW, frequency_penalty=2.0),
          SamplingParams(max_new_tokens=MAX_NEW, presence_penalty=-1.0, frequency_penalty=0.7, min_new_tokens=12),
          SamplingParams(max_new_tokens=MAX_NEW)]


def test_penalised_greedy_matches_transformers_in_one_batch(tiny_model_dir):
    model_dir = tiny_model_dir
    worker = make_worker(model_dir, max_num_batched_tokens=256)
    try:
        prompts = random_prompts(worker.info.vocab_size, seed=3)[4:4 + 2 * len(PARAMS)]
        params = PARAMS * 2
        results = run_all(worker, prompts, params)
    finally:
        worker.engine.stop()
    changed = 0
    for prompt, p, r in zip(prompts, params, results, strict=True):
        assert r.token_ids == hf_greedy(model_dir, prompt, p), p
        if not p.plain:  # (the test means something only if the penalties change what greedy decoding picks)
            changed += r.token_ids != hf_greedy(model_dir, prompt, SamplingParams(max_new_tokens=MAX_NEW))
    assert changed >= 3, changed
