"""bench/serve.py's pure parts: seeded length distributions, Poisson arrivals, metrics and goodput (no processes)."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from bench.serve import (
    Result,
    arrival_times,
    compute_metrics,
    length_sampler,
    make_prompt,
    make_requests,
    parse_goodput,
)


@pytest.mark.parametrize("spec,lo,hi", [("uniform:16:512", 16, 512), ("fixed:7", 7, 7),
                                        ("lognormal:100:1.0:4:1024", 4, 1024), ("sharegpt", 4, 1024)])
def test_lengths_are_seeded_and_within_bounds(spec, lo, hi):
    a = [length_sampler(spec)(random.Random(3)) for _ in range(1)]
    draw = length_sampler(spec)
    rng1, rng2 = random.Random(5), random.Random(5)
    xs = [draw(rng1) for _ in range(2000)]
    assert xs == [draw(rng2) for _ in range(2000)]
    assert all(lo <= x <= hi and isinstance(x, int) for x in xs + a)


def test_uniform_covers_its_range_and_sharegpt_has_a_long_tail():
    xs = [length_sampler("uniform:1:4")(r) for r in [random.Random(0)] for _ in range(400)]
    assert set(xs) == {1, 2, 3, 4}
    rng = random.Random(0)
    prompts = [length_sampler("sharegpt", "input")(rng) for _ in range(5000)]
    outputs = [length_sampler("sharegpt", "output")(rng) for _ in range(5000)]
    assert 80 <= statistics.median(prompts) <= 120 and 170 <= statistics.median(outputs) <= 230
    assert statistics.mean(prompts) > statistics.median(prompts)  # right-skewed
    assert max(prompts) == 1024  # clamped tail


@pytest.mark.parametrize("spec", ["uniform:5:4", "uniform:0:4", "fixed:0", "bogus", "lognormal:1:2", "uniform:a:b"])
def test_bad_length_specs_are_refused(spec):
    with pytest.raises(ValueError):
        length_sampler(spec)


def test_poisson_arrivals_have_the_right_mean_gap():
    rate = 4.0
    t = arrival_times(20000, rate, random.Random(1))
    gaps = [b - a for a, b in zip(t, t[1:], strict=False)]
    assert t[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(1 / rate, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(1 / rate, rel=0.05)  # exponential: sd == mean
    assert arrival_times(5, math.inf, random.Random(1)) == [0.0] * 5
    with pytest.raises(ValueError):
        arrival_times(3, 0.0, random.Random(1))


def test_requests_are_reproducible():
    a = make_requests(20, "uniform:8:64", "fixed:16", 2.0, seed=7)
    assert a == make_requests(20, "uniform:8:64", "fixed:16", 2.0, seed=7)
    assert a != make_requests(20, "uniform:8:64", "fixed:16", 2.0, seed=8)
    assert all(r.max_new_tokens == 16 and 8 <= r.approx_prompt_tokens <= 64 for r in a)
    assert len({r.prompt for r in a}) == 20
    assert len(make_prompt(random.Random(0), 100).split()) == 75


def _result(i, start, chunks, end, tokens=None, prompt=10, error=""):
    return Result(i, start=start, chunk_times=list(chunks), end=end,
                  output_tokens=len(chunks) if tokens is None else tokens, prompt_tokens=prompt,
                  expected_tokens=len(chunks) if tokens is None else tokens, error=error)


def test_metrics_from_synthetic_timestamps():
    # r0: TTFT 100 ms, 5 tokens, last at 500 ms -> TPOT (500-100)/4 = 100 ms; ITL gaps 100 x4
    r0 = _result(0, 0.0, [0.1, 0.2, 0.3, 0.4, 0.5], 0.5)
    # r1: starts at 1.0, TTFT 300 ms, 3 tokens, e2e 700 ms -> TPOT 200 ms; gaps 200, 200
    r1 = _result(1, 1.0, [1.3, 1.5, 1.7], 1.7)
    # r2: one token: TTFT 50 ms, no TPOT and no ITL
    r2 = _result(2, 0.0, [0.05], 0.05)
    failed = _result(3, 0.0, [], 0.2, tokens=0, error="UNAVAILABLE")
    m = compute_metrics([r0, r1, r2, failed], duration_s=2.0, goodput=parse_goodput("ttft_ms=150,tpot_ms=150"))
    assert (m["requests"], m["completed"], m["failed"]) == (4, 3, 1)
    assert m["total_output_tokens"] == 9 and m["total_input_tokens"] == 30
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.5)
    assert m["ttft_ms"]["mean"] == pytest.approx(150.0)
    assert m["ttft_ms"]["p50"] == pytest.approx(100.0)
    assert m["ttft_ms"]["p99"] == pytest.approx(300.0)
    assert m["tpot_ms"]["mean"] == pytest.approx(150.0)
    assert sorted(m["itl_ms"]) == ["mean", "p50", "p90", "p99"]
    assert m["itl_ms"]["mean"] == pytest.approx((4 * 100 + 2 * 200) / 6)
    assert m["itl_ms"]["p50"] == pytest.approx(100.0) and m["itl_ms"]["p99"] == pytest.approx(200.0)
    assert m["e2el_ms"]["p99"] == pytest.approx(700.0)
    # goodput: r0 (100, 100) and r2 (50, -) meet it; r1 (300, 200) and the failure do not
    g = m["goodput"]
    assert g["good_requests"] == 2 and g["request_goodput"] == pytest.approx(1.0) and g["fraction"] == 0.5
    assert m["errors"] == ["UNAVAILABLE"]


def test_goodput_parsing():
    assert parse_goodput(None) == {}
    assert parse_goodput("ttft_ms=500, tpot_ms=50,e2el_ms=9000") == {"ttft_ms": 500, "tpot_ms": 50, "e2el_ms": 9000}
    for bad in ("ttft=5", "ttft_ms", "tpot_ms=-1"):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    m = compute_metrics([_result(0, 0.0, [0.1, 0.2], 0.2)], 1.0, {"e2el_ms": 150})
    assert m["goodput"]["good_requests"] == 0
