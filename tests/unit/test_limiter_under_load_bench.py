"""bench/limiter_under_load.py's pure pieces: the bound, the tier file, metric and log parsing, tallies, the
summary and the comparison, argument parsing."""

from __future__ import annotations

import math
import tomllib

import grpc
import pytest

from bench.limiter_under_load import (
    BOUND_RATIO_TARGET,
    CONFIGS,
    LAUNCHERS,
    OLD_FLAGS,
    Tally,
    bound,
    compare,
    log_events,
    metric_value,
    parse_args,
    summarise,
    tier_toml,
)
from ratelimit.limiter import Limit
from ratelimit.tiers import parse_tiers
from router.config import build_parser, config_from_args


def test_bound_is_burst_plus_rate_times_elapsed():
    assert bound(10, 60.0, 7.6) == pytest.approx(17.6)  # 10 rpm burst, 7.6 s: 17.6 calls at most
    assert bound(5, 120.0, 0.0) == 5
    assert bound(5, 120.0, -1.0) == 5


def test_tier_file_gives_the_request_limit_and_never_limits_tokens():
    tiers = parse_tiers(tomllib.loads(tier_toml(60.0, 5)))
    assert tiers["metered"].requests == Limit(60.0, 5)
    assert tiers["metered"].tokens.burst >= 10**8


def test_metric_value_sums_samples_of_one_name():
    text = "\n".join([
        "# HELP llamagrid_router_ratelimit_fallbacks_total Answers.",
        "# TYPE llamagrid_router_ratelimit_fallbacks_total counter",
        "llamagrid_router_ratelimit_fallbacks_total 12.0",
        'llamagrid_router_ratelimit_decisions_total{outcome="allowed"} 3.0',
        'llamagrid_router_ratelimit_decisions_total{outcome="limited"} 4.0',
        "llamagrid_router_ratelimit_fallbacks_created 1.7e+09",
        "llamagrid_router_routers_alive 2.0",
    ])
    assert metric_value(text, "llamagrid_router_ratelimit_fallbacks_total") == 12.0
    assert metric_value(text, "llamagrid_router_ratelimit_decisions_total") == 7.0
    assert metric_value(text, "llamagrid_router_routers_alive") == 2.0
    assert metric_value(text, "llamagrid_router_ratelimit_replayed_total") == 0.0


def test_log_events_picks_json_lines_by_event():
    text = "\n".join([
        '{"event": "metrics_serving", "port": 4321}',
        "not json mentioning \"metrics_serving\"",
        '{"event": "ratelimit_backend_down", "op": "acquire"}',
        '{"event": "metrics_serving_later", "port": 1}',
    ])
    assert log_events(text, "metrics_serving") == [{"event": "metrics_serving", "port": 4321}]
    assert len(log_events(text, "ratelimit_backend_down")) == 1 and log_events(text, "router_started") == []


def test_tally_counts_outcomes_and_merges_windows():
    a = Tally(started=10.0, finished=12.0)
    for code in (grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.DEADLINE_EXCEEDED):
        a.add(code)
    assert (a.ok, a.limited, a.calls, a.elapsed_s) == (2, 1, 4, 2.0)
    assert a.admitted() == 2 and a.admitted(count_unknown=True) == 3  # an unknown outcome may have been admitted
    b = Tally(ok=1, limited=5, started=11.0, finished=15.0)
    m = a.merge(b)
    assert (m.ok, m.limited, m.other["DEADLINE_EXCEEDED"], m.started, m.finished) == (3, 6, 1, 10.0, 15.0)


def test_summary_ratio_and_verdict():
    s = summarise(Tally(ok=29, limited=100, started=0.0, finished=7.6), 10, 60.0, {"fallbacks": 74.0})
    assert s["bound"] == 17.6 and s["admitted_over_bound"] == pytest.approx(29 / 17.6, abs=1e-3)
    assert s["fallbacks"] == 74 and not s["passes"]
    at_target = summarise(Tally(ok=11, started=0.0, finished=0.0), 10, 60.0)
    assert at_target["admitted_over_bound"] == BOUND_RATIO_TARGET and at_target["passes"]


def test_compare_is_new_over_each_baseline():
    def run(ratio: float, fallbacks: int) -> dict:
        return {"load": {"admitted_over_bound": ratio, "fallbacks": fallbacks}}

    c = compare({"unbounded": run(2.0, 100), "tight": run(1.5, 50), "new": run(1.0, 0)})
    assert c == {"load new/unbounded": {"admitted_over_bound": 0.5, "fallbacks": 0.0},
                 "load new/tight": {"admitted_over_bound": 1.0 / 1.5, "fallbacks": 0.0}}
    assert compare({"new": run(1.0, 0)}) == {}
    zero = compare({"tight": run(1.0, 0), "new": run(1.0, 0)})["load new/tight"]
    assert math.isnan(zero["fallbacks"])


def test_parse_args_defaults_and_errors():
    args = parse_args([])
    assert args.configs == ["unbounded", "tight", "new"] and args.seconds > 0 and args.down_seconds > 0
    assert parse_args(["--configs", " new ,tight", "--down-seconds", "0"]).configs == ["new", "tight"]
    for bad in (["--configs", "newest"], ["--configs", ","], ["--seconds", "0"], ["--burst", "0"],
                ["--concurrency", "0"], ["--burners", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_tight_flags_are_the_unbounded_limiters_settings():
    config = config_from_args(build_parser().parse_args([*OLD_FLAGS, "--workers", "127.0.0.1:1"]), {})
    assert (config.redis_timeout_s, config.redis_max_timeout_s, config.fallback_share) == (0.05, 0.05, 1.0)
    assert CONFIGS["new"] == () and set(LAUNCHERS) == {"unbounded"}
