"""When a sequence is over: the one rule the scheduler, the engine's stop strings and resumed jobs all apply.

After each new token (and once for a job resumed with tokens another worker streamed) the first that holds wins:

- EOS: the token is one of the model's end-of-sequence tokens, unless the request set ignore_eos;
- LENGTH: max_new_tokens are out (validation clamps them so the prompt and they fit the context), or the
  sequence fills the scheduler's max_model_len;
- STOP: the text completed one of the request's stop strings (the detokenizer's TextStream finds it).

A deadline that passes or a cancel ends a sequence from outside, between steps: CANCELLED (Scheduler.abort).
"""

from __future__ import annotations

from worker.sequence import FinishReason, Sequence


def finish_reason(seq: Sequence, max_model_len: int, *, stop_string_seen: bool = False) -> FinishReason | None:
    """Why seq is over after its latest token, or None while it goes on. The scheduler asks without stop strings
    (it never sees text); the engine asks again once the token's text is known."""
    if seq.num_output_tokens and seq.token_ids[-1] in seq.eos_token_ids and not seq.params.ignore_eos:
        return FinishReason.EOS
    if seq.num_output_tokens >= seq.params.max_new_tokens or seq.num_tokens >= max_model_len:
        return FinishReason.LENGTH
    if stop_string_seen:
        return FinishReason.STOP
    return None
