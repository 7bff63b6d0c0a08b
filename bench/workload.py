"""The seeded benchmark workload and checkpoint shared by the benchmarks."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

BENCH_MODEL = dict(seed=0, num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=2,
                   intermediate_size=1376, vocab_size=32000)


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    max_new_tokens: int


def make_workload(num_requests: int = 64, prompt_range=(16, 512), output_range=(16, 256), vocab_size: int = 32000,
                  seed: int = 0) -> list[BenchRequest]:
    """Random prompts (ids 3..vocab-1, after <s>) with uniform prompt and output lengths."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        n = rng.randint(*prompt_range)
        prompt = [1] + [rng.randrange(3, vocab_size) for _ in range(n - 1)]
        out.append(BenchRequest(prompt, rng.randint(*output_range)))
    return out


def bench_model_dir(cache: Path) -> Path:
    from worker.model.tiny import make_tiny_model

    path = cache / "bench-llama-h512-l8"
    if not (path / "config.json").exists():
        make_tiny_model(path, **BENCH_MODEL)
    return path


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]
