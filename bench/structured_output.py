"""Structured output's cost: the same batch generated with a JSON-schema constraint and without, in one run.

    .venv/bin/python bench/structured_output.py [--requests 64] [--rounds 3]

An in-process worker on the bench workload's model (bench.workload: hidden 512, 8 layers, random weights, the
generated tokenizer). `--requests` requests at once, prompts of 16-512 random tokens (seeded), greedy:

- constrained: a schema whose documents run to a few hundred tokens (an array of up to 12 records with bounded
  strings, integers, enums and booleans), max_new_tokens 512: each completion ends (EOS) where its document does;
- unconstrained: the same prompts, each asked for exactly as many tokens as its constrained run produced (EOS
  ignored), so both sides compute the same tokens.

Reported per side: wall time and output tokens/s (median of --rounds, alternating sides), then constrained /
unconstrained; and the grammar's own cost: the time per step the mask filling took (on its thread, overlapped with
the model) and the compile time of the schema, first and cached.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workload import bench_model_dir  # noqa: E402
from worker.app import Worker  # noqa: E402
from worker.config import WorkerConfig  # noqa: E402
from worker.engine import EngineRequest, FinishEvent, TokenEvent  # noqa: E402
from worker.sequence import GrammarSpec, SamplingParams  # noqa: E402

SCHEMA = {"type": "array", "maxItems": 12, "minItems": 4, "items": {
    "type": "object", "additionalProperties": False, "required": ["id", "name", "kind", "active", "score"],
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999},
                   "name": {"type": "string", "maxLength": 16},
                   "kind": {"enum": ["alpha", "beta", "gamma", "delta"]},
                   "active": {"type": "boolean"},
                   "score": {"type": "integer", "minimum": -100, "maximum": 100}}}}


def run_batch(worker: Worker, prompts: list[list[int]], params: list[SamplingParams], tag: str) -> tuple[float, list]:
    done = threading.Event()
    outputs: list[list[int]] = [[] for _ in prompts]
    remaining = [len(prompts)]
    lock = threading.Lock()

    def sink_for(i: int):
        def sink(events) -> None:
            for e in events:
                if isinstance(e, TokenEvent):
                    outputs[i].extend(e.token_ids)
                elif isinstance(e, FinishEvent):
                    with lock:
                        remaining[0] -= 1
                        if remaining[0] == 0:
                            done.set()
        return sink

    t0 = time.perf_counter()
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        worker.engine.submit(EngineRequest(f"{tag}-{i}", p, sp, sink_for(i)))
    assert done.wait(3600)
    return time.perf_counter() - t0, outputs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = bench_model_dir(Path.home() / ".cache" / "llamagrid")
    worker = Worker(WorkerConfig(model_dir=model, kv_cache_tokens=65536, max_num_seqs=64))
    worker.engine.start()
    try:
        rng = random.Random(args.seed)
        vocab = worker.tokenizer.decoder.vocab_size
        prompts = [[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(16, 512))]
                   for _ in range(args.requests)]
        spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
        grammars = worker.engine.grammars
        t0 = time.perf_counter()
        grammars.check(spec, "bench")
        compile_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        grammars.check(spec, "bench")
        compile_cached = time.perf_counter() - t0
        constrained = [SamplingParams(max_new_tokens=512, grammar=spec)] * args.requests
        _, first = run_batch(worker, prompts, constrained, "warm")
        lengths = [len(o) for o in first]
        free = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]
        tokens = sum(lengths)
        walls = {"constrained": [], "unconstrained": []}
        for r in range(args.rounds):
            order = [("constrained", constrained), ("unconstrained", free)]
            if r % 2:
                order.reverse()
            for name, params in order:
                wall, outs = run_batch(worker, prompts, params, f"{name}-{r}")
                assert sum(len(o) for o in outs) == tokens, (name, sum(len(o) for o in outs), tokens)
                walls[name].append(wall)
        valid = sum(_valid(worker, o) for o in first)
    finally:
        worker.engine.stop()
    print(f"{args.requests} requests, {tokens} output tokens per side (documents of {min(lengths)}-{max(lengths)} "
          f"tokens), {valid}/{args.requests} parse as JSON")
    rates = {}
    for name, ws in walls.items():
        rates[name] = tokens / statistics.median(ws)
        print(f"  {name:13}  wall {statistics.median(ws):6.2f} s   {rates[name]:8.1f} output tokens/s  "
              f"(rounds: {', '.join(f'{w:.2f}' for w in ws)})")
    ratio = rates["constrained"] / rates["unconstrained"]
    print(f"  schema compile: {compile_first * 1e3:.2f} ms first, {compile_cached * 1e3:.3f} ms cached")
    print(f"constrained / unconstrained: {ratio:.3f}x")
    print(f"{'PASS' if ratio >= 0.8 else 'FAIL'}: constrained throughput at least 0.8x unconstrained")
    return 0


def _valid(worker: Worker, ids: list[int]) -> bool:
    text = worker.tokenizer.hf.decode(ids, skip_special_tokens=True)
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
