"""The limiter-under-load figure: how many calls one API key gets through two routers sharing one Redis, with the
host's CPUs saturated, against the token bucket's bound.

Setup per configuration (a fresh redis-server and two fresh `python -m router` processes each): a tier of
`--rpm` requests per minute with a burst of `--burst` (tokens never limit), one key of that tier, `--burners`
busy-loop processes keeping every core busy, and `--concurrency` asyncio clients calling ListModels (metered: one
request each, no worker needed) through both routers in turn, as fast as they are answered, for `--seconds`. A call
answered OK was admitted; RESOURCE_EXHAUSTED was not. The bucket allows at most

    bound = burst + rate x elapsed      (elapsed: from the first call sent to the last call answered)

so admitted / bound above 1 is what leaked. Then, unless `--down-seconds 0`: Redis is stopped (after one call
through each router, so both know the key) and the same clients call for `--down-seconds`; the routers fail open
onto their local buckets, and admitted / bound (same bound, over that phase) shows whether the two together stay
near one tier or admit one tier each.

Configurations, in one run (fresh Redis and routers each):
- unbounded: the limiter with an unbounded fallback (as at commit 2b650c2), put back into this tree's router by
  `unbounded_router()`: a 50 ms socket timeout and a fixed 0.25 s deadline per call, no retry on a broken connection,
  local fallback buckets holding the whole tier, starting full (never set from Redis' answers) and forgetting what
  they admitted (never written back). Not put back: after NOSCRIPT each caller loaded the script on a connection of
  its own (a burst of new connections right after a Redis restart); this tree sends SCRIPT LOAD in the batch;
- tight: that limiter's settings on this tree's code — `--redis-timeout 0.05 --redis-max-timeout 0.05
  --fallback-share 1` (the whole tier per router, a 50 ms deadline), with the mirroring and write-back kept;
- new: the defaults — a deadline that follows Redis' observed latency (4 x p99, floor 0.25 s, ceiling 2 s), local
  buckets holding 1 / routers alive of the tier (ratelimit.peers) mirrored from Redis' last answer, and the local
  charges written back to Redis when it recovers.

Per configuration it prints admitted, bound, admitted/bound, the local-bucket answers (router metric
llamagrid_router_ratelimit_fallbacks_total, both routers), the Redis-failure episodes (`ratelimit_backend_down` log
lines) and the charges written back (llamagrid_router_ratelimit_replayed_total); then new/unbounded and new/tight of
admitted/bound and of the local answers. Target: under CPU load the new configuration's
admitted/bound is at most 1.10.

    .venv/bin/python bench/limiter_under_load.py                       # about 40 s
    .venv/bin/python bench/limiter_under_load.py --configs unbounded,new --down-seconds 0 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protos.llamagrid.v1 import inference_pb2 as pb  # noqa: E402
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

BOUND_RATIO_TARGET = 1.10
OLD_FLAGS = ("--redis-timeout", "0.05", "--redis-max-timeout", "0.05", "--fallback-share", "1")
CONFIGS: dict[str, tuple[str, ...]] = {"unbounded": OLD_FLAGS, "tight": OLD_FLAGS, "new": ()}
ROUTER = ("-m", "router")
UNBOUNDED_ROUTER = ("-c", "from bench.limiter_under_load import unbounded_router; unbounded_router()")
LAUNCHERS = {"unbounded": UNBOUNDED_ROUTER}
TIER = "metered"
FALLBACKS_METRIC = "llamagrid_router_ratelimit_fallbacks_total"
REPLAYED_METRIC = "llamagrid_router_ratelimit_replayed_total"
ROUTERS_METRIC = "llamagrid_router_routers_alive"


# ---- pure pieces


def bound(burst: int, rpm: float, elapsed_s: float) -> float:
    """The most a token bucket of `burst` refilling `rpm` per minute admits in `elapsed_s`, starting full."""
    return burst + rpm / 60.0 * max(0.0, elapsed_s)


def tier_toml(rpm: float, burst: int, name: str = TIER) -> str:
    """A tier file with one tier: `rpm` requests per minute, `burst` at once, tokens never the limit."""
    return (f"[tiers.{name}]\nrequests_per_minute = {rpm!r}\nrequest_burst = {burst}\n"
            "tokens_per_minute = 100000000\n")


def metric_value(metrics_text: str, name: str) -> float:
    """The sum of a metric's samples (every label set) in a Prometheus text exposition; 0 when absent."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})?\s+(\S+)$")
    for line in metrics_text.splitlines():
        m = pattern.match(line)
        if m:
            total += float(m.group(1))
    return total


def log_events(text: str, event: str) -> list[dict]:
    """The structlog JSON lines of `text` whose event is `event` (other lines, JSON or not, are skipped)."""
    out = []
    for line in text.splitlines():
        if f'"{event}"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            out.append(record)
    return out


@dataclass
class Tally:
    """Outcomes of one phase's calls: OK (admitted), RESOURCE_EXHAUSTED (denied) and any other status code."""

    ok: int = 0
    limited: int = 0
    other: Counter = field(default_factory=Counter)
    started: float = math.nan
    finished: float = math.nan

    @property
    def calls(self) -> int:
        return self.ok + self.limited + sum(self.other.values())

    @property
    def elapsed_s(self) -> float:
        return self.finished - self.started

    def admitted(self, count_unknown: bool = False) -> int:
        """Calls admitted: OK ones, plus (`count_unknown`) those whose outcome the client cannot tell (any code
        other than RESOURCE_EXHAUSTED, e.g. a deadline that passed after the router admitted)."""
        return self.ok + (sum(self.other.values()) if count_unknown else 0)

    def add(self, code: grpc.StatusCode) -> None:
        if code == grpc.StatusCode.OK:
            self.ok += 1
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self.limited += 1
        else:
            self.other[code.name] += 1

    def merge(self, other: Tally) -> Tally:
        out = Tally(self.ok + other.ok, self.limited + other.limited, self.other + other.other,
                    min(self.started, other.started), max(self.finished, other.finished))
        return out


def summarise(tally: Tally, burst: int, rpm: float, counts: dict[str, float] | None = None) -> dict:
    """One phase's figures: calls, admitted, the bound and their ratio, plus `counts` (e.g. fallbacks)."""
    b = bound(burst, rpm, tally.elapsed_s)
    return {"calls": tally.calls, "admitted": tally.ok, "denied": tally.limited, "other": dict(tally.other),
            "elapsed_s": round(tally.elapsed_s, 3), "bound": round(b, 2),
            "admitted_over_bound": round(tally.ok / b, 3), **{k: int(v) for k, v in (counts or {}).items()},
            "passes": tally.ok <= BOUND_RATIO_TARGET * b}


def ratio(new: float, old: float) -> float:
    if old == 0:
        return math.inf if new else math.nan
    return new / old


def compare(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """new/baseline of admitted/bound and of the local-bucket answers, per baseline (unbounded, tight) and phase that
    both ran: keys like "load new/unbounded"."""
    out = {}
    for baseline in ("unbounded", "tight"):
        if baseline not in results or "new" not in results:
            continue
        for phase in ("load", "down"):
            if phase in results["new"] and phase in results[baseline]:
                out[f"{phase} new/{baseline}"] = {
                    what: ratio(results["new"][phase][what], results[baseline][phase][what])
                    for what in ("admitted_over_bound", "fallbacks")}
    return out


# ---- processes


def unbounded_router() -> None:
    """`python -m router` with this tree's limiter put back the way it worked at commit 2b650c2 (an unbounded fallback),
    for the `unbounded` baseline; run with OLD_FLAGS. Put back: a client that never retries (socket timeout 50 ms) and
    a fixed 0.25 s deadline per call; local buckets that are never set from Redis' answers (so a fallback starts
    from a full bucket) and charges that are never written back. Not put back: the script (re)load that each
    caller did on its own connection after NOSCRIPT."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    import router.server
    from ratelimit.limiter import RateLimiter
    from ratelimit.local import LocalLimiter
    from ratelimit.policy import GuardedLimiter
    from router.__main__ import main as router_main

    def connect(url: str, timeout_s: float = 0.05, connect_timeout_s: float | None = None, **kwargs):
        return aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                       retry=Retry(NoBackoff(), 0), retry_on_timeout=False, **kwargs)

    limiter_init = RateLimiter.__init__

    def fixed_deadline(self, redis_client, prefix="rl", timeout_s=0.25, max_timeout_s=None) -> None:
        limiter_init(self, redis_client, prefix, timeout_s=0.25)

    router.server.connect = connect
    RateLimiter.__init__ = fixed_deadline
    GuardedLimiter._mirror = lambda self, key, tier, d: None
    GuardedLimiter._owe = lambda self, key, bucket, limit, units: None
    LocalLimiter.mirror = lambda self, key, bucket, limit, level: None
    sys.exit(router_main(sys.argv[1:]))


async def create_key(redis_url: str, tier: str = TIER, tenant: str = "tenant-bench") -> str:
    """A new API key of `tier` (plaintext) in the key store at `redis_url`."""
    from ratelimit.limiter import connect
    from router.keys import ApiKeyStore

    client = connect(redis_url, timeout_s=2.0)
    try:
        _, key = await ApiKeyStore(client).create(tenant, tier, [])
        return key
    finally:
        await client.aclose()


class RouterProcess:
    """`python -m router` on a free port with metrics on, its JSON log in `log_path`. No worker is needed: the
    calls made here (ListModels) are metered but served by the router alone."""

    def __init__(self, redis_url: str, tiers_path: Path, log_path: Path, args: Sequence[str] = (),
                 launcher: Sequence[str] = ROUTER) -> None:
        from common.ports import free_ports

        self.log_path = log_path
        self.port_file = log_path.with_suffix(".port")
        self.port_file.unlink(missing_ok=True)
        (dead_worker,) = free_ports(1)  # nothing listens there: the pool stays empty, ListModels lists nothing
        argv = [sys.executable, *launcher, "--port", "0", "--port-file", str(self.port_file),
                "--metrics-port", "0", "--redis-url", redis_url, "--workers", f"127.0.0.1:{dead_worker}",
                "--tiers", str(tiers_path), "--drain-grace", "0", *args]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=log, start_new_session=True)
        self.address = ""
        self.metrics_port: int | None = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, event: str) -> list[dict]:
        return log_events(self.log_text(), event)

    def wait_ready(self, timeout_s: float = 30.0) -> RouterProcess:
        """Until the port file is written and the metrics port logged."""
        deadline = time.monotonic() + timeout_s
        while not (self.port_file.exists() and self.port_file.read_text().strip()
                   and self.events("metrics_serving")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"router did not start (exit {self.proc.poll()}):\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{int(self.port_file.read_text())}"
        self.metrics_port = int(self.events("metrics_serving")[0]["port"])
        return self

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str) -> float:
        return metric_value(self.metrics(), name)

    def routers_seen(self) -> int:
        """The live routers this router counts now (ratelimit.peers): it holds 1 / that of each tier."""
        return int(self.metric(ROUTERS_METRIC))

    def fallbacks(self) -> float:
        return self.metric(FALLBACKS_METRIC)

    def counts(self) -> dict[str, float]:
        """Local-bucket answers, write-backs after recovery, and Redis-failure episodes so far."""
        text = self.metrics()
        return {"fallbacks": metric_value(text, FALLBACKS_METRIC), "replayed": metric_value(text, REPLAYED_METRIC),
                "backend_down": len(self.events("ratelimit_backend_down"))}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def routers(count: int, redis_url: str, tiers_path: Path, log_dir: Path, args: Sequence[str] = (),
            timeout_s: float = 30.0, launcher: Sequence[str] = ROUTER) -> Iterator[list[RouterProcess]]:
    """`count` routers on one Redis, yielded once each has logged that it sees all `count` (so each holds its
    share of the tiers); stopped on exit. Pass `--router-heartbeat` in `args` to see each other sooner."""
    started: list[RouterProcess] = []
    try:
        for i in range(count):
            started.append(RouterProcess(redis_url, tiers_path, log_dir / f"router-{i}.log", args, launcher))
        for r in started:
            r.wait_ready(timeout_s)
        deadline = time.monotonic() + timeout_s
        while not all(r.routers_seen() == count for r in started):
            if time.monotonic() > deadline:
                raise RuntimeError(f"routers never all saw {count} routers: {[r.routers_seen() for r in started]}")
            time.sleep(0.05)
        yield started
    finally:
        for r in started:
            r.stop()


@contextlib.contextmanager
def cpu_burners(count: int) -> Iterator[list[subprocess.Popen]]:
    """`count` processes spinning a CPU each until the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(count)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def hammer(addresses: Sequence[str], key: str, seconds: float, concurrency: int = 8,
           call_timeout_s: float = 10.0) -> Tally:
    """`concurrency` clients calling ListModels with `key` through `addresses` in turn (client i starts at
    address i), each sending its next call when the last is answered, until `seconds` have passed."""

    async def main() -> Tally:
        tally = Tally()
        metadata = (("authorization", f"Bearer {key}"),)
        channels = [grpc.aio.insecure_channel(a) for a in addresses]
        try:
            stubs = [pb_grpc.InferenceStub(ch) for ch in channels]
            for ch in channels:
                await asyncio.wait_for(ch.channel_ready(), timeout=call_timeout_s)
            tally.started = time.monotonic()
            stop_at = tally.started + seconds

            async def client(i: int) -> None:
                n = i
                while time.monotonic() < stop_at:
                    try:
                        await stubs[n % len(stubs)].ListModels(pb.ListModelsRequest(), metadata=metadata,
                                                               timeout=call_timeout_s)
                        tally.add(grpc.StatusCode.OK)
                    except grpc.aio.AioRpcError as exc:
                        tally.add(exc.code())
                    n += 1

            await asyncio.gather(*(client(i) for i in range(concurrency)))
            tally.finished = time.monotonic()
            return tally
        finally:
            for ch in channels:
                await ch.close()

    return asyncio.run(main())


def one_call_each(addresses: Sequence[str], key: str, timeout_s: float = 10.0) -> Tally:
    """One ListModels through each router, in order (each router verifies the key and sees the bucket)."""
    tally = Tally(started=time.monotonic())
    for address in addresses:
        with grpc.insecure_channel(address) as ch:
            try:
                pb_grpc.InferenceStub(ch).ListModels(pb.ListModelsRequest(),
                                                     metadata=(("authorization", f"Bearer {key}"),),
                                                     timeout=timeout_s, wait_for_ready=True)
                tally.add(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                tally.add(exc.code())
    tally.finished = time.monotonic()
    return tally


# ---- one configuration


def run_config(name: str, flags: Sequence[str], args: argparse.Namespace, log_dir: Path) -> dict:
    from ratelimit.redis_server import RedisServer

    tiers_path = log_dir / "tiers.toml"
    tiers_path.write_text(tier_toml(args.rpm, args.burst))
    out: dict = {"config": name, "flags": list(flags)}
    with RedisServer() as redis, routers(2, redis.url, tiers_path, log_dir / name,
                                         (*flags, "--router-heartbeat", str(args.heartbeat)),
                                         launcher=LAUNCHERS.get(name, ROUTER)) as pair:
        addresses = [r.address for r in pair]
        key = asyncio.run(create_key(redis.url, tenant=f"tenant-{name}-load"))
        with cpu_burners(args.burners):
            tally = hammer(addresses, key, args.seconds, args.concurrency)
        after_load = total_counts(pair)
        out["load"] = summarise(tally, args.burst, args.rpm, after_load)
        if args.down_seconds > 0:
            key = asyncio.run(create_key(redis.url, tenant=f"tenant-{name}-down"))
            warm = one_call_each(addresses, key)
            redis.stop()
            tally = warm.merge(hammer(addresses, key, args.down_seconds, args.concurrency))
            out["down"] = summarise(tally, args.burst, args.rpm,
                                    {k: v - after_load[k] for k, v in total_counts(pair).items()})
    return out


def total_counts(pair: Sequence[RouterProcess]) -> dict[str, float]:
    out: Counter = Counter()
    for r in pair:
        out.update(r.counts())
    return dict(out)


def print_result(r: dict) -> None:
    for phase in ("load", "down"):
        s = r.get(phase)
        if s is None:
            continue
        other = f", other {s['other']}" if s["other"] else ""
        print(f"{r['config']:>4} {phase:>4}: admitted {s['admitted']:>3} of {s['calls']:>5} calls in "
              f"{s['elapsed_s']:5.2f} s; bound {s['bound']:6.2f}; admitted/bound {s['admitted_over_bound']:.3f}; "
              f"local answers {s['fallbacks']:>5}; backend_down {s['backend_down']:>3}; replayed {s['replayed']:>2}"
              f"{other}", flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=8.0, help="length of the under-load phase")
    p.add_argument("--down-seconds", type=float, default=4.0, help="length of the Redis-down phase (0: skip it)")
    p.add_argument("--rpm", type=float, default=60.0, help="the tier's requests per minute")
    p.add_argument("--burst", type=int, default=10, help="the tier's request burst")
    p.add_argument("--burners", type=int, default=2 * (os.cpu_count() or 1),
                   help="busy-loop processes during the under-load phase (default: 2 per CPU)")
    p.add_argument("--concurrency", type=int, default=64, help="clients calling at once, through both routers")
    p.add_argument("--heartbeat", type=float, default=0.5, help="the routers' --router-heartbeat")
    p.add_argument("--configs", default="unbounded,tight,new",
                   help=f"configurations to run, in order: {', '.join(CONFIGS)}")
    p.add_argument("--keep-logs", action="store_true", help="keep the routers' logs (printed: where)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not args.configs or not set(args.configs) <= set(CONFIGS):
        p.error(f"--configs: one or more of {', '.join(CONFIGS)}")
    if args.seconds <= 0 or args.down_seconds < 0 or args.rpm <= 0 or args.burst < 1 or args.burners < 0 \
            or args.concurrency < 1 or args.heartbeat <= 0:
        p.error("--seconds, --rpm, --heartbeat must be positive; --burst, --concurrency >= 1; --down-seconds, "
                "--burners >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log_dir = Path(tempfile.mkdtemp(prefix="llamagrid-limiter-load-"))
    print(f"tier: {args.rpm:g} requests/min, burst {args.burst}; 2 routers, 1 Redis; {args.burners} CPU burners on "
          f"{os.cpu_count()} CPUs; {args.concurrency} clients; {args.seconds:g} s under load"
          + (f", then {args.down_seconds:g} s with Redis stopped" if args.down_seconds else ""), flush=True)
    results = {}
    try:
        for name in args.configs:
            (log_dir / name).mkdir()
            results[name] = run_config(name, CONFIGS[name], args, log_dir)
            print_result(results[name])
    finally:
        if args.keep_logs:
            print(f"logs: {log_dir}")
        else:
            import shutil

            shutil.rmtree(log_dir, ignore_errors=True)
    results["comparison"] = compare(results)
    for which, c in results["comparison"].items():
        print(f"{which}: admitted/bound {c['admitted_over_bound']:.3f}, local answers {c['fallbacks']:.3f}",
              flush=True)
    if "new" in results:
        print(f"acceptance (new, under load: admitted/bound <= {BOUND_RATIO_TARGET}): "
              f"{'PASS' if results['new']['load']['passes'] else 'FAIL'}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
