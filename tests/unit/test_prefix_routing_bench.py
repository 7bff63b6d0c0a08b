"""bench/prefix_routing.py's pure parts: the seeded workload's shape and skew, the summary and the verdict."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from bench.prefix_routing import make_workload, summarise, verdict

CORPUS = ["the", "cat", "sat", "on", "a", "mat", "and", "the", "dog", "ran", "far", "away"]


def test_workload_is_seeded_shared_and_poisson():
    a = make_workload(8, 400, 5.0, 1, None, CORPUS)
    assert a == make_workload(8, 400, 5.0, 1, None, CORPUS) and a != make_workload(8, 400, 5.0, 2, None, CORPUS)
    counts = Counter(r.prefix for r in a)
    assert set(counts) == set(range(8)) and max(counts.values()) < 2.5 * min(counts.values())
    assert len({r.text for r in a}) == 400  # every question unique
    for r in a:  # a request is its prefix plus a question
        assert r.text.startswith(f"Document {r.prefix}. ")
    assert 400 / a[-1].at_s == pytest.approx(5.0, rel=0.15)
    skewed = make_workload(8, 1000, 5.0, 1, 0.8, CORPUS)
    assert Counter(r.prefix for r in skewed)[0] / 1000 == pytest.approx(0.8, abs=0.04)


def test_summary_and_verdict():
    ok = [{"ok": True, "ttft_ms": float(t), "prompt_tokens": 100, "cached_tokens": c, "completion_tokens": 16}
          for t, c in zip(range(1, 101), [80] * 100, strict=True)]
    lines = [{"method": "GenerateStream", "worker": w, "prompt_tokens": 100, "cached_prompt_tokens": 80}
             for w in ["a"] * 30 + ["b"] * 70] + [{"method": "ListModels", "worker": ""}]
    s = summarise(ok + [{"ok": False}], 10.0, lines)
    assert s["errors"] == 1 and s["hit_rate"] == pytest.approx(0.8) and s["ttft_ms_p90"] == pytest.approx(90, abs=1)
    assert s["prefill_shares"] == {"a": pytest.approx(0.3), "b": pytest.approx(0.7)}
    assert s["busiest_vs_mean"] == pytest.approx(1.4)
    load = {**s, "errors": 0, "ttft_ms_p90": 100.0, "output_tok_s": 100.0, "hit_rate": 0.4, "busiest_vs_mean": 1.0}
    cache = {**load, "ttft_ms_p90": 40.0, "output_tok_s": 140.0, "hit_rate": 0.85, "busiest_vs_mean": 1.2}
    checks = {name: passed for name, passed, _ in verdict({"shared": {"load": load, "cache": cache,
                                                                     "cache x2": {**cache, "hit_rate": 0.8}},
                                                          "skewed": {"load": load, "cache": cache}})}
    assert all(checks.values()) and len(checks) == 8
    rng = random.Random(0)
    worse = {**cache, "hit_rate": 0.4 + rng.random() * 0.3}
    assert not dict((n, p) for n, p, _ in verdict({"shared": {"load": load, "cache": worse}}))[
        "shared: cache hit rate cache/load"]


def test_routing_decision_bench_decides_on_its_pool(tiny_model_dir):
    """bench/routing_decision.py's pool (the router's WorkerPool with views, no channels) routes a held document's
    prompt to a worker holding it, and a load-only decision still picks a worker."""
    from bench.routing_decision import MODEL, make_pool

    tokenizer_json = (tiny_model_dir / "tokenizer.json").read_text()
    rng = random.Random(0)
    documents = [" ".join(rng.choice(CORPUS) for _ in range(200)) + f" {d}" for d in range(4)]
    pool = make_pool(tokenizer_json, 4, 1000, documents, rng)
    reasons = []
    pool.on_decision = lambda reason, predicted, model: reasons.append(reason)
    for text in documents:
        blocks = pool.prompt_blocks(MODEL, text + " and a question?")
        cached = pool.cached_tokens(MODEL, blocks)
        assert len(cached) == 4 and sum(n > 0 for n in cached.values()) == 2, cached  # each document on two workers
        assert pool.pick(MODEL, prompt=blocks) is not None
    assert set(reasons) <= {"cache", "spill"} and "cache" in reasons  # (the workers' loads are random)
    assert pool.pick(MODEL) is not None and reasons[-1] == "load"
