"""bench/router_overhead.py's pure parts: per-target summaries, paired differences and their intervals."""

from __future__ import annotations

import random

import pytest

from bench.router_overhead import Block, compare, verdict


def _block(latency_ms: float, ttft_ms: float, cpu_s: float = 0.01) -> Block:
    return Block(wall_s=latency_ms / 1e3, tokens=32, latency_ms=[latency_ms], last_token_ms=[latency_ms - 0.2],
                 ttft_ms=[ttft_ms], cpu={"worker": cpu_s, "router": cpu_s, "relay": cpu_s, "client": cpu_s})


def test_one_stream_pairs_rounds_and_brackets_each_median():
    rng = random.Random(0)
    direct = [60.0 + rng.gauss(0, 5) for _ in range(200)]  # the machine's drift, shared by the round's requests
    blocks = {"direct": [_block(d, 4.0) for d in direct],
              "router": [_block(d + 2.5 + rng.gauss(0, 0.3), 6.0) for d in direct],
              "relay": [_block(d + 1.5 + rng.gauss(0, 0.3), 5.5) for d in direct]}
    out = compare(blocks, random.Random(1))
    paired = out["paired"]
    assert paired["router-direct"]["p50_ms"] == pytest.approx(2.5, abs=0.15)
    assert paired["relay-direct"]["p50_ms"] == pytest.approx(1.5, abs=0.15)
    assert paired["router-relay"]["p50_ms"] == pytest.approx(1.0, abs=0.15)
    assert paired["router-direct"]["ttft_p50_ms"] == pytest.approx(2.0)
    for p in paired.values():
        lo, hi = p["ci95_ms"]
        assert lo <= p["p50_ms"] <= hi and hi - lo < 0.5  # pairing cancels the drift: a narrow interval
    lo, hi = out["added_p50_ci95_ms"]  # unpaired: the drift stays in, so the interval is much wider
    assert lo <= out["added_p50_ms"] <= hi and hi - lo > 1.0
    assert out["paired_added_ms_p50"] == paired["router-direct"]["p50_ms"]
    assert out["router_vs_direct"]["cpu_ms_per_request"] == pytest.approx(10.0)
    assert out["throughput_ratio"] == out["router_vs_direct"]["throughput_ratio"] < 1.0
    (_, skipped, _), (name, ok, detail) = verdict({1: out})  # with the relay measured, it is the baseline
    assert skipped is None and name == "router - relay at 1 stream"
    assert ok is (paired["router-relay"]["p50_ms"] <= 0.5) and "95% CI" in detail and "paired" in detail
    without_relay = compare({k: v for k, v in blocks.items() if k != "relay"}, random.Random(1))
    [(name, ok, detail)] = verdict({1: without_relay})
    assert name == "added p50 latency at 1 stream" and ok is (without_relay["added_p50_ms"] <= 2.0)


def test_several_streams_have_no_pairs_and_no_relay_is_fine():
    blocks = {"direct": [Block(1.0, 320, [50.0] * 10, [49.0] * 10, [5.0] * 10, {k: 0.1 for k in
                                                                                 ("worker", "router", "relay",
                                                                                  "client")})],
              "router": [Block(1.25, 320, [55.0] * 10, [54.0] * 10, [6.0] * 10, {k: 0.2 for k in
                                                                                  ("worker", "router", "relay",
                                                                                   "client")})]}
    out = compare(blocks, random.Random(0))
    assert "paired" not in out and "relay_vs_direct" not in out
    assert out["throughput_ratio"] == pytest.approx(0.8)
    assert out["added_p50_ms"] == pytest.approx(5.0)
    assert out["router_cpu_ms_per_request"] == pytest.approx(20.0)
