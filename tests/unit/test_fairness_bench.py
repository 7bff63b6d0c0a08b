"""bench/fairness.py's arithmetic: TTFT summaries, ratios to the alone phase, the verdict, the implied step time."""

from __future__ import annotations

import math

from bench.fairness import TTFT_RATIO_TARGET, compare, step_ms, summarise


def test_summarise_reports_percentiles_and_max():
    s = summarise([float(x) for x in range(1, 101)])
    assert s["requests"] == 100 and s["ttft_ms_max"] == 100.0
    assert s["ttft_ms_p50"] == 51.0 and s["ttft_ms_p99"] == 99.0  # nearest rank, as bench.workload.percentile
    assert math.isnan(summarise([])["ttft_ms_p50"]) and math.isnan(summarise([])["ttft_ms_max"])


def test_compare_is_loaded_over_alone_and_passes_at_the_target():
    alone = summarise([10.0, 10.0, 20.0])
    at_target = compare(alone, summarise([10.0 * TTFT_RATIO_TARGET] * 3))
    assert at_target["ttft_p50_ratio"] == TTFT_RATIO_TARGET and at_target["passes"]
    over = compare(alone, summarise([25.0, 30.0, 400.0]))
    assert over["ttft_p50_ratio"] == 3.0 and over["ttft_p99_ratio"] == 20.0 and not over["passes"]


def test_step_time_is_slots_over_flood_throughput():
    assert step_ms(4, 800.0) == 5.0
    assert math.isnan(step_ms(4, 0.0))
