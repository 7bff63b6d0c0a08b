"""Tier files and hot reload, the local token bucket, the Redis failure policy, and RouterConfig (no Redis)."""

from __future__ import annotations

import asyncio
import math
import os
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from ratelimit.limiter import Decision, Limit, QuotaDecision, RateLimitBackendError
from ratelimit.local import LocalLimiter
from ratelimit.policy import FailurePolicy, GuardedLimiter, LimiterCounters, LimiterUnavailable
from ratelimit.tiers import DEFAULT_TIERS, Tier, TierSource, load_tiers, parse_tiers
from router.config import PEPPER_ENV, RouterConfig, build_parser, config_from_args

TIERS = """
[tiers.free]
requests_per_minute = 60
tokens_per_minute = 20000
request_burst = 10
token_burst = 5000

[tiers.pro]
requests_per_minute = 600
tokens_per_minute = 400000
"""


class Clock:
    """A settable clock in seconds."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _write(path: Path, text: str, mtime: float) -> None:
    path.write_text(text)
    os.utime(path, (mtime, mtime))


# --- tiers ---------------------------------------------------------------------------------------------------------


def test_load_tiers_with_and_without_bursts(tmp_path):
    path = tmp_path / "tiers.toml"
    path.write_text(TIERS)
    tiers = load_tiers(path)
    assert tiers["free"] == Tier("free", Limit(60, 10), Limit(20000, 5000))
    assert tiers["pro"] == Tier("pro", Limit(600, 600), Limit(400000, 400000))  # bursts default to the rate


def test_default_tiers_are_valid():
    assert {"free", "pro"} <= set(DEFAULT_TIERS)
    assert all(t.name == name for name, t in DEFAULT_TIERS.items())


@pytest.mark.parametrize(("data", "message"), [
    ({}, "at least one"),
    ({"tiers": {"free": 3}}, "'free': must be a table"),
    ({"tiers": {"free": {"tokens_per_minute": 5}}}, "'free': missing required field requests_per_minute"),
    ({"tiers": {"free": {"requests_per_minute": 5}}}, "'free': missing required field tokens_per_minute"),
    ({"tiers": {"free": {"requests_per_minute": 0, "tokens_per_minute": 5}}}, "'free': requests_per_minute"),
    ({"tiers": {"pro": {"requests_per_minute": 1, "tokens_per_minute": "many"}}}, "'pro': tokens_per_minute"),
    ({"tiers": {"pro": {"requests_per_minute": 1, "tokens_per_minute": True}}}, "'pro': tokens_per_minute"),
    ({"tiers": {"pro": {"requests_per_minute": 1, "tokens_per_minute": 5, "token_burst": 2.5}}}, "'pro': token_burst"),
    ({"tiers": {"pro": {"requests_per_minute": 1, "tokens_per_minute": 5, "request_burst": -1}}}, "request_burst"),
    ({"tiers": {"pro": {"requests_per_minute": 1, "tokens_per_minute": 5, "rpm": 3}}}, "unknown field(s) rpm"),
])
def test_parse_tiers_errors_name_tier_and_field(data, message):
    with pytest.raises(ValueError) as info:
        parse_tiers(data)
    assert message in str(info.value)


def test_load_tiers_bad_toml(tmp_path):
    path = tmp_path / "tiers.toml"
    path.write_text("[tiers.free\n")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_tiers(path)


def test_tier_source_defaults_without_file():
    source = TierSource(None)
    assert source.get("free") == DEFAULT_TIERS["free"]
    assert source.get("nope") is None


def test_tier_source_hot_reload_and_broken_edit(tmp_path):
    path, clock = tmp_path / "tiers.toml", Clock()
    _write(path, TIERS, 1_000_000)
    source = TierSource(path, check_interval_s=1.0, clock=clock)
    assert source.get("pro").requests.rate_per_minute == 600

    _write(path, TIERS.replace("600", "900"), 1_000_010)
    clock.t += 0.5
    assert source.get("pro").requests.rate_per_minute == 600  # not checked before the interval
    clock.t += 0.5
    assert source.get("pro").requests.rate_per_minute == 900
    assert source.last_error is None

    _write(path, TIERS.replace("tokens_per_minute = 400000", "tokens_per_minute = -1"), 1_000_020)
    clock.t += 1
    assert source.get("pro").requests.rate_per_minute == 900  # last good tiers kept
    assert "'pro': tokens_per_minute" in source.last_error

    path.unlink()
    clock.t += 1
    assert source.get("free") is not None and source.last_error

    _write(path, "[tiers.gold]\nrequests_per_minute = 5\ntokens_per_minute = 50\n", 1_000_030)
    clock.t += 1
    assert source.get("gold") == Tier("gold", Limit(5, 5), Limit(50, 50))
    assert source.get("pro") is None and source.last_error is None


def test_tier_source_bad_file_fails_at_startup(tmp_path):
    path = tmp_path / "tiers.toml"
    path.write_text("[tiers]\n")
    with pytest.raises(ValueError):
        TierSource(path)
    with pytest.raises(OSError):
        TierSource(tmp_path / "missing.toml")


# --- local bucket ----------------------------------------------------------------------------------------------------

RPM = Limit.per_second(1, 3)  # 1 request/s, burst 3
TPM = Limit.per_second(10, 100)  # 10 tokens/s, burst 100


def test_local_burst_then_refill():
    clock = Clock()
    lim = LocalLimiter(clock)
    for i in range(3):
        d = lim.acquire_quota("k", RPM, TPM, 10)
        assert d.allowed and d.requests.remaining == 2 - i
    d = lim.acquire_quota("k", RPM, TPM, 10)
    assert not d.allowed and not d.requests.allowed and d.tokens.allowed
    assert d.retry_after_s == pytest.approx(1.0)
    assert d.tokens.remaining == 70  # the denied call debited nothing
    clock.t += 1.0
    d = lim.acquire_quota("k", RPM, TPM, 10)
    assert d.allowed and d.requests.remaining == 0 and d.tokens.remaining == 70  # 70 + 10 refilled - 10
    assert lim.acquire_quota("other", RPM, TPM, 10).allowed  # keys are independent


def test_local_both_or_neither():
    lim = LocalLimiter(Clock())
    d = lim.acquire_quota("k", RPM, TPM, 101)
    assert d.requests.allowed and not d.tokens.allowed and d.tokens.retry_after_s == math.inf
    assert d.requests.remaining == 3  # request bucket not debited either
    d = lim.acquire_quota("k", RPM, TPM, 100)
    assert d.allowed and d.tokens.remaining == 0 and d.tokens.reset_after_s == pytest.approx(10.0)
    d = lim.acquire_quota("k", RPM, TPM, 5)
    assert not d.allowed and d.tokens.retry_after_s == pytest.approx(0.5)
    assert d.requests.remaining == 2 and d.requests.limit == 3


def test_local_refund_capped_at_burst():
    lim = LocalLimiter(Clock())
    assert lim.acquire_quota("k", RPM, TPM, 60).tokens.remaining == 40
    d = lim.refund("k", TPM, 25)
    assert isinstance(d, Decision) and d.allowed and d.remaining == 65
    assert lim.refund("k", TPM, 1000).remaining == 100
    assert len(lim) == 1  # a full bucket is forgotten; the request bucket is not full
    with pytest.raises(ValueError):
        lim.refund("k", TPM, -1)
    with pytest.raises(ValueError):
        lim.acquire("k", [("tok", TPM, -1)])


def test_local_debit_goes_into_debt_and_later_calls_wait():
    clock = Clock()
    lim = LocalLimiter(clock)
    assert lim.acquire_quota("k", RPM, TPM, 90).tokens.remaining == 10
    d = lim.debit("k", TPM, 30)  # used 30 more than reserved: charged anyway, 20 in debt
    assert not d.allowed and d.remaining == 0 and d.reset_after_s == pytest.approx(12.0)
    d = lim.acquire_quota("k", RPM, TPM, 10)
    assert not d.allowed and d.tokens.retry_after_s == pytest.approx(3.0)  # from -20 to 10 at 10/s
    clock.t += 3.0
    assert lim.acquire_quota("k", RPM, TPM, 10).allowed
    with pytest.raises(ValueError):
        lim.debit("k", TPM, -1)


def test_local_bounded_memory():
    lim = LocalLimiter(Clock(), max_buckets=10)
    for i in range(50):
        lim.acquire_quota(f"k{i}", RPM, TPM, 1)
    assert len(lim) <= 10


# --- failure policy --------------------------------------------------------------------------------------------------

TIER = Tier("t", RPM, TPM)


class FakeRedisLimiter:
    """Stands in for RateLimiter: fails while `down`, else answers allowed and records the call."""

    def __init__(self) -> None:
        self.down = False
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise RateLimitBackendError("rate-limit backend failed: ConnectionError: refused")

    async def acquire_quota(self, key, rpm, tpm, tokens, abandoned=None):
        self._check()  # answers as if the shared buckets were full: the local ones mirror that
        return QuotaDecision(Decision(True, rpm.burst, 0.0, 0.0, rpm.burst),
                             Decision(True, tpm.burst, 0.0, 0.0, tpm.burst))

    async def refund(self, key, limit, amount, bucket="tok"):
        self._check()
        return Decision(True, 7, 0.0, 0.0, limit.burst)


def _guarded(policy=FailurePolicy.FAIL_OPEN):
    redis, clock = FakeRedisLimiter(), Clock()
    g = GuardedLimiter(redis, LocalLimiter(clock), policy, LimiterCounters(), cooldown_s=1.0, clock=clock)
    return g, redis, clock


def test_fail_open_falls_back_counts_and_recovers():
    async def main():
        g, redis, clock = _guarded()
        assert g.policy is FailurePolicy.FAIL_OPEN
        d = await g.acquire_quota("k", TIER, 10)
        assert d.allowed and not d.degraded and redis.calls == 1 and not g.degraded

        redis.down = True
        for i in range(3):  # local burst of 3 requests
            d = await g.acquire_quota("k", TIER, 10)
            assert d.allowed and d.degraded and d.requests.remaining == 2 - i
        assert not (await g.acquire_quota("k", TIER, 10)).allowed  # local limits still apply
        assert redis.calls == 2  # Redis skipped during the cool-down
        assert g.counters == LimiterCounters(backend_errors=1, fallbacks=4)
        assert g.degraded
        assert (await g.refund("k", TIER, 5)).remaining == 75  # refunds go to the local bucket too

        clock.t += 1.0  # cool-down over: Redis retried, still down
        assert (await g.acquire_quota("k", TIER, 10)).degraded
        assert redis.calls == 3 and g.counters.backend_errors == 2

        redis.down = False
        clock.t += 1.0
        d = await g.acquire_quota("k", TIER, 10)
        assert d.allowed and not d.degraded and not g.degraded
        assert g.counters.recoveries == 1 and redis.calls == 4
        assert (await g.refund("k", TIER, 5)).remaining == 7

    asyncio.run(main())


def test_fail_closed_raises_and_recovers():
    async def main():
        g, redis, clock = _guarded(FailurePolicy.FAIL_CLOSED)
        redis.down = True
        with pytest.raises(LimiterUnavailable):
            await g.acquire_quota("k", TIER, 10)
        with pytest.raises(LimiterUnavailable):
            await g.acquire_quota("k", TIER, 10)
        assert await g.refund("k", TIER, 5) is None  # best effort: never raises
        assert g.counters == LimiterCounters(backend_errors=1, fallbacks=0, unavailable=2)
        redis.down = False
        clock.t += 1.0
        assert not (await g.acquire_quota("k", TIER, 10)).degraded
        assert g.counters.recoveries == 1

    asyncio.run(main())


def test_no_cooldown_retries_redis_every_call():
    async def main():
        redis = FakeRedisLimiter()
        g = GuardedLimiter(redis, cooldown_s=0.0)
        redis.down = True
        await g.acquire_quota("k", TIER, 1)
        await g.acquire_quota("k", TIER, 1)
        assert redis.calls == 2 and g.counters.backend_errors == 2 and g.counters.fallbacks == 2

    asyncio.run(main())


# --- RouterConfig ----------------------------------------------------------------------------------------------------


def test_router_config_from_args_reads_env_only_when_called():
    args = build_parser().parse_args(["--workers", "w1:50061, w2:50061", "--failure-policy", "fail-closed",
                                      "--tiers", "/etc/tiers.toml"])
    cfg = config_from_args(args, environ={PEPPER_ENV: "s3cret", "LLAMAGRID_REDIS_URL": "redis://r:6379/0"})
    assert cfg.workers == "w1:50061, w2:50061"
    assert cfg.failure_policy is FailurePolicy.FAIL_CLOSED and cfg.tiers_path == Path("/etc/tiers.toml")
    assert cfg.key_pepper == b"s3cret" and "s3cret" not in repr(cfg)
    assert cfg.redis_url == "redis://r:6379/0" and cfg.redis_timeout_s == 0.25
    assert cfg.fallback_share is None and cfg.redis_max_timeout_s == 2.0
    cfg = config_from_args(build_parser().parse_args(["--fallback-share", "0.5", "--redis-max-timeout", "3"]), {})
    assert cfg.fallback_share == 0.5 and cfg.redis_max_timeout_s == 3.0
    cfg = config_from_args(build_parser().parse_args(["--workers", "dns:worker:50061"]), environ={})
    assert cfg.workers == "dns:worker:50061" and cfg.redis_url is None and cfg.key_pepper == b""
    assert cfg.failure_policy is FailurePolicy.FAIL_OPEN
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--failure-policy", "maybe"])


@pytest.mark.parametrize(("changes", "message"), [
    ({"workers": ""}, "no worker targets"),
    ({"workers": "nohost"}, "host:port"),
    ({"workers": "a:0"}, "port must be"),
    ({"workers": "dns:w"}, "host:port"),
    ({"workers": ("a:1",)}, "discovery spec"),
    ({"discovery_interval_s": 0}, "discovery_interval_s"),
    ({"port": 70000}, "port must be"),
    ({"redis_url": "http://x"}, "redis_url"),
    ({"redis_timeout_s": 0}, "redis_timeout_s"),
    ({"redis_max_timeout_s": 0}, "redis_max_timeout_s"),
    ({"fallback_share": 0}, "fallback_share"),
    ({"fallback_share": 1.5}, "fallback_share"),
    ({"router_heartbeat_s": 0}, "router_heartbeat_s"),
    ({"max_auth_failures": 0}, "max_auth_failures"),
    ({"retry_attempts": -1}, "retry_attempts"),
    ({"failure_policy": "fail-open"}, "failure_policy"),
    ({"default_model": " "}, "default_model"),
])
def test_router_config_validation(changes, message):
    base = RouterConfig(workers="w:50061")
    with pytest.raises(ValueError, match=message):
        replace(base, **changes)


def test_readme_tier_file_is_the_default_tiers():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = "[tiers.free]" + readme.split("```toml\n[tiers.free]", 1)[1].split("```", 1)[0]
    assert parse_tiers(tomllib.loads(block)) == DEFAULT_TIERS
