"""Request checks: requested parameters -> SamplingParams, or InvalidRequest naming the field."""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.errors import InvalidRequest
from common.request_ids import MAX_JOB_ID_CHARS
from worker.sequence import GrammarSpec, SamplingParams
from worker.tokenizer import GenerationDefaults

MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 20  # most likely tokens reported per position (OpenAI's top_logprobs limit)
MAX_TENANT_CHARS = 128


@dataclass(frozen=True, slots=True)
class Limits:
    max_context: int  # tokens a sequence may hold (prompt + generated)
    default_max_new_tokens: int
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_message_chars: int = 100_000


@dataclass(frozen=True, slots=True)
class RequestedParameters:
    """Sampling parameters as the caller sent them (worker.server reads them off the wire): None where a field
    was not set, so its default applies."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_new_tokens: int | None = None
    logprobs: int | None = None
    grammar: GrammarSpec | None = None
    grammars_set: tuple[str, ...] = ()  # the structured-output fields the caller set (at most one may be)


def _finite(value: float, field: str) -> float:
    if math.isnan(value) or math.isinf(value):
        raise InvalidRequest(field, "must be a finite number")
    return value


def check_parameters(p: RequestedParameters, limits: Limits, prefix: str = "parameters") -> None:
    """Check every parameter that does not depend on the prompt length."""
    if p.max_new_tokens is not None:
        if p.max_new_tokens == 0:
            raise InvalidRequest(f"{prefix}.max_new_tokens", "must be at least 1")
        if p.max_new_tokens > limits.max_context:
            raise InvalidRequest(
                f"{prefix}.max_new_tokens",
                f"{p.max_new_tokens} is above the model's context of {limits.max_context} tokens",
            )
    if p.temperature is not None and _finite(p.temperature, f"{prefix}.temperature") < 0:
        raise InvalidRequest(f"{prefix}.temperature", "must be >= 0 (0 means greedy)")
    if p.top_p is not None:
        top_p = _finite(p.top_p, f"{prefix}.top_p")
        if not 0.0 < top_p <= 1.0:
            raise InvalidRequest(f"{prefix}.top_p", "must be in (0, 1]")
    if p.repetition_penalty is not None and _finite(p.repetition_penalty, f"{prefix}.repetition_penalty") <= 0:
        raise InvalidRequest(f"{prefix}.repetition_penalty", "must be > 0 (1 disables it)")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(p, name)
        if value is not None and not -2.0 <= _finite(value, f"{prefix}.{name}") <= 2.0:
            raise InvalidRequest(f"{prefix}.{name}", f"must be in [-2, 2] (0 disables it), got {value:g}")
    if p.min_new_tokens is not None:
        if p.min_new_tokens > limits.max_context:
            raise InvalidRequest(f"{prefix}.min_new_tokens",
                                 f"{p.min_new_tokens} is above the model's context of {limits.max_context} tokens")
        if p.max_new_tokens is not None and p.min_new_tokens > p.max_new_tokens:
            raise InvalidRequest(f"{prefix}.min_new_tokens",
                                 f"{p.min_new_tokens} is above max_new_tokens ({p.max_new_tokens})")
    if len(p.grammars_set) > 1:
        raise InvalidRequest(f"{prefix}.{p.grammars_set[1]}", f"set at most one of {', '.join(p.grammars_set)}")
    if p.grammar is not None and p.ignore_eos:
        raise InvalidRequest(f"{prefix}.ignore_eos", f"cannot be set with {p.grammar.kind}: the completion ends "
                                                    "when the constraint is complete")
    if p.logprobs is not None and p.logprobs > MAX_LOGPROBS:
        raise InvalidRequest(f"{prefix}.logprobs", f"at most {MAX_LOGPROBS}, got {p.logprobs}")
    if p.seed is not None and p.seed > MAX_SEED:
        raise InvalidRequest(f"{prefix}.seed", f"must be at most {MAX_SEED}")
    if len(p.stop) > limits.max_stop_strings:
        raise InvalidRequest(f"{prefix}.stop", f"at most {limits.max_stop_strings} stop strings, got {len(p.stop)}")
    for i, s in enumerate(p.stop):
        if not s:
            raise InvalidRequest(f"{prefix}.stop[{i}]", "must not be empty")
        if len(s) > limits.max_stop_chars:
            raise InvalidRequest(f"{prefix}.stop[{i}]", f"longer than {limits.max_stop_chars} characters")


def check_request_id(request_id: str, field: str) -> None:
    if not request_id or len(request_id) > MAX_JOB_ID_CHARS:
        raise InvalidRequest(field, f"must be 1..{MAX_JOB_ID_CHARS} characters")


def check_tenant(tenant: str, field: str) -> None:
    if len(tenant) > MAX_TENANT_CHARS:
        raise InvalidRequest(field, f"must be at most {MAX_TENANT_CHARS} characters")


def check_prompt_length(num_prompt_tokens: int, limits: Limits, field: str) -> None:
    if num_prompt_tokens == 0:
        raise InvalidRequest(field, "must not be empty")
    if num_prompt_tokens >= limits.max_context:
        raise InvalidRequest(
            field,
            f"prompt has {num_prompt_tokens} tokens; the model's context is {limits.max_context} tokens "
            "and at least one must be left to generate",
        )


def check_resume_tokens(resume_token_ids, num_prompt_tokens: int, vocab_size: int, limits: Limits,
                        field: str) -> None:
    """Tokens a resumed request already generated: valid ids, and prompt + them within the context."""
    for i, t in enumerate(resume_token_ids):
        if t >= vocab_size:
            raise InvalidRequest(f"{field}[{i}]", f"token id {t} is outside the vocabulary of {vocab_size}")
    if num_prompt_tokens + len(resume_token_ids) > limits.max_context:
        raise InvalidRequest(
            field,
            f"the prompt's {num_prompt_tokens} tokens plus {len(resume_token_ids)} resumed tokens exceed the "
            f"model's context of {limits.max_context} tokens",
        )


def resolve_parameters(
    p: RequestedParameters, num_prompt_tokens: int, limits: Limits, defaults: GenerationDefaults
) -> SamplingParams:
    """Apply defaults and clamp max_new_tokens to what fits after the prompt (then LENGTH ends it)."""
    room = limits.max_context - num_prompt_tokens
    wanted = limits.default_max_new_tokens if p.max_new_tokens is None else p.max_new_tokens
    return SamplingParams(
        max_new_tokens=max(1, min(wanted, room)),
        temperature=defaults.temperature if p.temperature is None else p.temperature,
        top_p=defaults.top_p if p.top_p is None else p.top_p,
        top_k=defaults.top_k if p.top_k is None else p.top_k,
        seed=p.seed,
        stop=p.stop,
        repetition_penalty=defaults.repetition_penalty if p.repetition_penalty is None else p.repetition_penalty,
        ignore_eos=p.ignore_eos,
        presence_penalty=p.presence_penalty or 0.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        min_new_tokens=p.min_new_tokens or 0,
        logprobs=p.logprobs,
        grammar=p.grammar,
    )


def check_text(text: str, limits: Limits, field: str) -> None:
    if not text:
        raise InvalidRequest(field, "must not be empty")
    if len(text) > limits.max_message_chars:
        raise InvalidRequest(field, f"longer than {limits.max_message_chars} characters")
