"""What a call reserves from its key's token bucket before a worker has counted anything: a prompt estimate from
its characters plus the most it may generate. Settlement corrects it to the workers' exact usage."""

from __future__ import annotations

from collections.abc import Sequence

from protos.llamagrid.v1 import inference_pb2 as pb

CHARS_PER_TOKEN = 3  # fewer than Llama's tokenizer averages on English: the estimate errs on the high side
MESSAGE_OVERHEAD_TOKENS = 4  # a chat message's template tokens ([INST], role markers)


def max_new(params: pb.SamplingParameters, default: int) -> int:
    return params.max_new_tokens if params.HasField("max_new_tokens") else default


def estimate_text(text: str, params: pb.SamplingParameters, default_max_new: int) -> int:
    """Tokens reserved for one text job."""
    return len(text) // CHARS_PER_TOKEN + 1 + max_new(params, default_max_new)


def estimate_chat(messages: Sequence[pb.ChatMessage], params: pb.SamplingParameters, default_max_new: int) -> int:
    """Tokens reserved for one chat turn (or a CountTokens of a conversation, with max_new_tokens 0)."""
    prompt = sum(len(m.content) // CHARS_PER_TOKEN + MESSAGE_OVERHEAD_TOKENS for m in messages)
    return prompt + max_new(params, default_max_new)
