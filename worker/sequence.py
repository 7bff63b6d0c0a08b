"""Per-request state inside the engine: sampling parameters, tokens, block table (no torch)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field


class FinishReason(enum.IntEnum):
    # values equal llamagrid.v1.FinishReason
    LENGTH = 1
    STOP = 2
    EOS = 3
    CANCELLED = 4


class SequenceStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED = 3


JSON_SCHEMA, REGEX, JSON_OBJECT = "json_schema", "regex", "json_object"


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """What a request's output must match (worker.grammar): `kind` json_schema, regex or json_object, `text` the
    schema (JSON text) or the regex."""

    kind: str
    text: str = ""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Validated, resolved sampling parameters of one request (defaults already applied)."""

    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0  # 1 = off
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # 0 = off; over the output tokens only (vLLM's semantics)
    frequency_penalty: float = 0.0  # 0 = off
    min_new_tokens: int = 0  # no end-of-sequence token before this many output tokens
    logprobs: int | None = None  # None: none; N: each token's logprob and the N most likely at its position
    grammar: GrammarSpec | None = None  # structured output: the tokens allowed at each step (worker.grammar)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain(self) -> bool:
        """Whether the logits go to sampling untouched (no penalty, no min_new_tokens)."""
        return (self.repetition_penalty == 1.0 and self.presence_penalty == 0.0 and self.frequency_penalty == 0.0
                and self.min_new_tokens == 0 and self.grammar is None)


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """A sampled token's log-probability (log-softmax of the raw logits) and the most likely (id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


_arrival = itertools.count()


@dataclass(slots=True, eq=False)
class Sequence:
    """One request as the scheduler and model runner see it.

    token_ids holds prompt + generated tokens. num_computed_tokens counts tokens whose KV is in the
    cache (prefix-cache hits included); it falls back to 0 on preemption (recompute).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at last admission
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    tenant: str = ""  # whose request (worker.fair_queue shares admissions and running slots among tenants)
    weight: int = 1  # the tenant's share relative to other tenants' (>= 1)
    arrival: int = field(default_factory=lambda: next(_arrival))
    constraint: object | None = None  # its grammar's matcher (worker.grammar.Constraint), with params.grammar

    def __post_init__(self) -> None:
        assert self.weight >= 1, f"{self.request_id}: weight must be at least 1"
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
