"""Structured output from the tiny random model: 200 generations under varied JSON schemas (nested objects,
arrays, enums, integer ranges, numbers, booleans, required fields), greedy and seeded, batched together; every one
parses and validates against its schema (the `jsonschema` package). Also "any JSON object", regular expressions, a
resumed constrained job, and schemas the engine refuses."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from common.errors import InvalidRequest
from tests.engine_utils import make_worker, run_all
from worker.sequence import GrammarSpec, SamplingParams

NAME = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 130}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
     "required": ["colour", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
                                      "count": {"type": "integer", "minimum": -5, "maximum": 5}},
     "required": ["tags", "count"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999}, "name": NAME},
        "required": ["id", "name"], "additionalProperties": False},
        "roles": {"type": "array", "items": {"enum": ["admin", "dev"]}, "minItems": 1, "maxItems": 2}},
     "required": ["user", "roles"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                           "maximum": 99},
                                                "minItems": 2, "maxItems": 2},
                                      "label": {"type": ["string", "null"], "maxLength": 6}},
     "required": ["point"], "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {"k": {"enum": ["x", "y"]},
                                                                 "v": {"type": "boolean"}},
                                "required": ["k", "v"], "additionalProperties": False}, "maxItems": 3},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1},
                                      "why": {"type": "string", "maxLength": 10}},
     "required": ["score"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no", 42, None]}}, "required": ["answer"],
     "additionalProperties": False},
]


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    w = make_worker(tiny_model_dir, max_num_batched_tokens=512, max_num_seqs=64)
    yield w
    w.engine.stop()


def _runs(n: int) -> list[tuple[list[int], SamplingParams, dict]]:
    rng = random.Random(5)
    out = []
    for i in range(n):
        schema = SCHEMAS[i % len(SCHEMAS)]
        prompt = [1] + [rng.randrange(3, 1000) for _ in range(rng.randrange(2, 30))]
        sampled = dict(temperature=rng.choice([0.7, 1.0, 1.3]), top_p=rng.choice([1.0, 0.9]), seed=i) if i % 2 else {}
        params = SamplingParams(max_new_tokens=256, grammar=GrammarSpec("json_schema", json.dumps(schema)), **sampled)
        out.append((prompt, params, schema))
    return out


def test_200_schema_constrained_generations_validate(worker):
    runs = _runs(200)
    results = run_all(worker, [p for p, _, _ in runs], [sp for _, sp, _ in runs])
    for (_, _, schema), r in zip(runs, results, strict=True):
        assert r.finish_reason is not None and r.finish_reason.name == "EOS", (r.finish_reason, r.text, schema)
        jsonschema.validate(json.loads(r.text), schema)


def test_any_json_object_and_regex(worker):
    regex = r"(cat|dog)-[0-9]{2,4}!"
    params = [SamplingParams(max_new_tokens=256, grammar=GrammarSpec("json_object")),
              SamplingParams(max_new_tokens=256, temperature=1.0, seed=4, grammar=GrammarSpec("json_object")),
              SamplingParams(max_new_tokens=64, grammar=GrammarSpec("regex", regex)),
              SamplingParams(max_new_tokens=64, temperature=1.0, seed=9, grammar=GrammarSpec("regex", regex))]
    results = run_all(worker, [[1, 40, 41], [1, 50], [1, 60, 61, 62], [1, 70]], params, prefix="misc")
    for r in results[:2]:
        assert isinstance(json.loads(r.text), dict), r.text
    for r in results[2:]:
        assert re.fullmatch(regex, r.text), r.text


def test_a_resumed_constrained_job_continues_its_grammar(worker):
    """A job resumed on another worker with the tokens already streamed (failover) keeps to the same document."""
    from tests.engine_utils import Result
    from worker.engine import EngineRequest

    schema = SCHEMAS[3]
    params = SamplingParams(max_new_tokens=256, grammar=GrammarSpec("json_schema", json.dumps(schema)))
    [whole] = run_all(worker, [[1, 7, 8, 9]], params, prefix="whole")
    cut = len(whole.token_ids) // 2
    resumed = Result()
    worker.engine.submit(EngineRequest("resumed", [1, 7, 8, 9], params, resumed.sink,
                                       resume_token_ids=whole.token_ids[:cut]))
    assert resumed.done.wait(60) and resumed.error is None
    assert whole.token_ids[:cut] + resumed.token_ids == whole.token_ids


@pytest.mark.parametrize(("spec", "field"), [
    (GrammarSpec("json_schema", '{"type": "nonsense"}'), "parameters.json_schema"),
    (GrammarSpec("json_schema", "{not json"), "parameters.json_schema"),
    (GrammarSpec("regex", "(unclosed"), "parameters.regex"),
])
def test_a_grammar_that_does_not_compile_is_invalid_argument_naming_the_field(worker, spec, field):
    with pytest.raises(InvalidRequest) as err:
        worker.engine.grammars.check(spec, field)
    assert err.value.field == field and "cannot be compiled" in err.value.message
