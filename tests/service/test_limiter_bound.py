"""One key's admissions through two routers sharing one Redis stay within its token bucket's bound (burst + rate x
elapsed, +10%) — with every CPU of the host busy (Redis healthy, but the routers slow to hear it), and with Redis
stopped (fail-open: each router's local buckets hold its half of the tier, mirrored from Redis' last answer, so the
two together admit about one tier, not one each).

Real processes: redis-server, two `python -m router` (no worker: ListModels is metered and needs none), busy-loop
CPU burners; the scenario's pieces are bench/limiter_under_load.py's, which measures the same against the older
settings (a fixed 50 ms deadline, the whole tier per router)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.limiter_under_load import (
    BOUND_RATIO_TARGET,
    RouterProcess,
    bound,
    cpu_burners,
    create_key,
    hammer,
    one_call_each,
    routers,
    tier_toml,
)
from ratelimit.redis_server import RedisServer

RPM, BURST = 60.0, 5


@contextlib.contextmanager
def cluster(tmp_path: Path, *args: str) -> Iterator[tuple[RedisServer, list[RouterProcess]]]:
    """One Redis, two routers (extra `args`) that each count two routers alive, a tier of RPM/BURST."""
    tiers = tmp_path / "tiers.toml"
    tiers.write_text(tier_toml(RPM, BURST))
    with RedisServer() as redis, routers(2, redis.url, tiers, tmp_path, ("--router-heartbeat", "0.5", *args)) as pair:
        yield redis, pair


def _describe(pair: list[RouterProcess]) -> str:
    return "; ".join(f"router {i}: {r.counts()}" for i, r in enumerate(pair))


def test_admissions_stay_within_the_bound_with_the_cpus_saturated(tmp_path):
    with cluster(tmp_path) as (redis, pair):
        key = asyncio.run(create_key(redis.url))
        with cpu_burners(2 * (os.cpu_count() or 1)):
            tally = hammer([r.address for r in pair], key, seconds=6.0, concurrency=64)
        limit = bound(BURST, RPM, tally.elapsed_s)
        admitted = tally.admitted(count_unknown=True)  # a call that ended otherwise may have been admitted
        detail = f"{tally}; bound {limit:.2f}; {_describe(pair)}"
        assert tally.limited > 0 and tally.ok >= BURST, detail  # the key was driven past its tier
        assert admitted <= BOUND_RATIO_TARGET * limit, detail


@pytest.mark.parametrize(("share", "within"), [
    (None, True),  # default: 1 / routers alive
    ("1", False),  # each router's local buckets hold the whole tier (the older sizing)
], ids=["share-of-routers-alive", "whole-tier-each"])
def test_with_redis_stopped_two_routers_admit_about_one_tier(tmp_path, share, within):
    with cluster(tmp_path, *(("--fallback-share", share) if share else ())) as (redis, pair):
        key = asyncio.run(create_key(redis.url))
        warm = one_call_each([r.address for r in pair], key)  # both routers know the key and mirror its bucket
        assert warm.ok == 2
        redis.stop()
        tally = warm.merge(hammer([r.address for r in pair], key, seconds=3.0, concurrency=4))
        limit = bound(BURST, RPM, tally.elapsed_s)
        detail = f"{tally}; bound {limit:.2f}; {_describe(pair)}"
        assert all(r.fallbacks() > 0 for r in pair), detail  # both answered from their local buckets
        assert sum(tally.other.values()) == 0 and tally.limited > 0, detail  # fail-open: served or limited
        assert tally.ok > 2, detail
        assert (tally.ok <= BOUND_RATIO_TARGET * limit) is within, detail
