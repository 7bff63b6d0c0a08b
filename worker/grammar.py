"""Structured output: a JSON schema, a regular expression or "any JSON object" constrains which tokens may come next.

llguidance (Microsoft's grammar engine, a Rust wheel with no dependencies) compiles each constraint for the model's
tokenizer and gives, per step, a bitmask of the tokens allowed. It was chosen over xgrammar by measurement on this
CPU (the tiny model's tokenizer, a nested schema): the mask costs about the same per step (0.02-0.06 ms against
0.065 ms), compiling a schema 0.7 ms against 1.2 ms, but xgrammar's wheel pulls triton and tvm-ffi (about 1 GB)
into a CPU install that has no use for them.

A compiled grammar is cached per worker (the same schema compiles once); each sequence gets its own matcher, which
consumes every token the sequence takes (resumed ones included). Whitespace between JSON tokens is not free: a
model that likes spaces cannot spin in them until its budget is out.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import llguidance
import llguidance.hf
import torch

from common.errors import InvalidRequest
from worker.sequence import JSON_OBJECT, REGEX, GrammarSpec

CACHED_GRAMMARS = 256
# "any JSON object" as a schema: an object whose values may be anything
_ANY_OBJECT = json.dumps({"type": "object"})
_JSON_OPTIONS = {"whitespace_flexible": False}


class Grammars:
    """The worker's grammar compiler: checks and caches grammars, makes a matcher per sequence."""

    def __init__(self, hf_tokenizer, vocab_size: int) -> None:
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)
        self.vocab_size = vocab_size
        self._compiled: OrderedDict[GrammarSpec, str] = OrderedDict()

    def check(self, spec: GrammarSpec, field: str) -> None:
        """Compile `spec` (cached) or raise InvalidRequest naming `field`."""
        self.grammar(spec, field)

    def grammar(self, spec: GrammarSpec, field: str = "grammar") -> str:
        grammar = self._compiled.get(spec)
        if grammar is not None:
            self._compiled.move_to_end(spec)
            return grammar
        try:
            if spec.kind == REGEX:
                grammar = llguidance.LLMatcher.grammar_from_regex(spec.text)
            else:
                schema = _ANY_OBJECT if spec.kind == JSON_OBJECT else spec.text
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except Exception as exc:  # noqa: BLE001 - the engine's own message: why the grammar is refused
            raise InvalidRequest(field, f"cannot be compiled: {_first_line(exc)}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise InvalidRequest(field, f"cannot be compiled: {_first_line(error)}")
        self._compiled[spec] = grammar
        while len(self._compiled) > CACHED_GRAMMARS:
            self._compiled.popitem(last=False)
        return grammar

    def matcher(self, spec: GrammarSpec, taken=()) -> Constraint:
        """A new matcher for a sequence, having consumed `taken` (the tokens a resumed request already has)."""
        constraint = Constraint(llguidance.LLMatcher(self.tokenizer, self.grammar(spec)))
        for token in taken:
            constraint.accept(token)
        return constraint


class Constraint:
    """One sequence's matcher."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def accept(self, token: int) -> None:
        # a token the mask allowed is always accepted; after the grammar stops (its end-of-sequence taken) there is
        # nothing left to check
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    return torch.full((num_rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


_BITS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] with every token whose bit is clear in bitmask [N, ceil(V/32)] set to -inf (a new tensor)."""
    allowed = ((bitmask.to(logits.device)[:, :, None] >> _BITS.to(logits.device)) & 1).bool()
    allowed = allowed.reshape(bitmask.shape[0], -1)[:, : logits.shape[1]]
    return logits.masked_fill(~allowed, -float("inf"))


_EXECUTOR: llguidance.LLExecutor | None = None


def fill_all(constraints, bitmask: torch.Tensor) -> torch.Tensor:
    """Row i of bitmask [N, ceil(V/32)] from constraints[i] (None: the row stays all ones). One call for the whole
    batch, which llguidance computes without the GIL (and in parallel on its own threads): a call per row would take
    the GIL back after each row, from a model step that holds it between its operations."""
    global _EXECUTOR
    rows = [(c.matcher, row) for row, c in enumerate(constraints) if c is not None]
    if rows:
        if _EXECUTOR is None:
            _EXECUTOR = llguidance.LLExecutor()
        _EXECUTOR.unsafe_compute_mask_ptr(rows, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])
    return bitmask


def _first_line(error: object) -> str:
    return str(error).strip().split("\n", 1)[0][:300]
