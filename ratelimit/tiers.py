"""Rate-limit tiers (requests and tokens per minute per API key) from a TOML file, re-read when it changes."""

from __future__ import annotations

import math
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from ratelimit.limiter import Limit

log = structlog.get_logger("ratelimit.tiers")

_FIELDS = ("requests_per_minute", "tokens_per_minute", "request_burst", "token_burst", "weight",
           "max_concurrent_requests", "max_chat_sessions")
_OPTIONAL_INTS = _FIELDS[2:]


@dataclass(frozen=True)
class Tier:
    """One named tier: a requests-per-minute bucket and a tokens-per-minute bucket per API key, plus its share.

    `weight`: the key's share of a worker's admissions relative to other tenants' (worker fair scheduling).
    `max_concurrent_requests`: a key's Generate/GenerateStream calls and Chat turns in flight at once, cluster-wide
    (each of N live routers enforces ceil(cap / N): router.concurrency).
    `max_chat_sessions`: a key's open Chat streams at once, cluster-wide likewise."""

    name: str
    requests: Limit
    tokens: Limit
    weight: int = 1
    max_concurrent_requests: int = 64
    max_chat_sessions: int = 64


def _tier(name: str, rpm: float, tpm: float, request_burst: int | None = None, token_burst: int | None = None,
          weight: int | None = None, max_concurrent_requests: int | None = None,
          max_chat_sessions: int | None = None) -> Tier:
    return Tier(name, Limit(rpm, request_burst or max(1, math.floor(rpm))),
                Limit(tpm, token_burst or max(1, math.floor(tpm))), weight or 1,
                max_concurrent_requests or Tier.max_concurrent_requests, max_chat_sessions or Tier.max_chat_sessions)


DEFAULT_TIERS: Mapping[str, Tier] = {
    "free": _tier("free", 60, 20_000, request_burst=10, weight=1, max_concurrent_requests=4, max_chat_sessions=8),
    "pro": _tier("pro", 600, 400_000, weight=4, max_concurrent_requests=64, max_chat_sessions=256),
}


def _number(name: str, field: str, value: object, *, integer: bool) -> float | int:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"tier {name!r}: {field} must be {kind}, got {value!r}")
    return value


def parse_tiers(data: Mapping[str, object]) -> dict[str, Tier]:
    """Tiers from parsed TOML (`[tiers.<name>]` tables); ValueError names the tier and field at fault."""
    tables = data.get("tiers")
    if not isinstance(tables, dict) or not tables:
        raise ValueError("tier file must define at least one [tiers.<name>] table")
    tiers = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ValueError(f"tier {name!r}: must be a table, got {type(table).__name__}")
        unknown = sorted(set(table) - set(_FIELDS))
        if unknown:
            raise ValueError(f"tier {name!r}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(_FIELDS)}")
        for field in _FIELDS[:2]:
            if field not in table:
                raise ValueError(f"tier {name!r}: missing required field {field}")
        rpm = _number(name, "requests_per_minute", table["requests_per_minute"], integer=False)
        tpm = _number(name, "tokens_per_minute", table["tokens_per_minute"], integer=False)
        extra = {f: _number(name, f, table[f], integer=True) for f in _OPTIONAL_INTS if f in table}
        tiers[name] = _tier(name, rpm, tpm, **extra)
    return tiers


def load_tiers(path: str | Path) -> dict[str, Tier]:
    """Read and validate a tier file; raises ValueError (bad TOML or values) or OSError (unreadable)."""
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"tier file {path}: invalid TOML: {exc}") from exc
    return parse_tiers(data)


class TierSource:
    """Tiers by name from a file (or DEFAULT_TIERS when path is None), re-read when the file's mtime changes.

    The mtime is checked at most every `check_interval_s`. A broken edit keeps the last good tiers and sets
    `last_error`; the next good edit clears it. The first load raises, so a bad file fails at startup.
    """

    def __init__(self, path: str | Path | None = None, check_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path) if path is not None else None
        self.check_interval_s = check_interval_s
        self.last_error: str | None = None
        self._clock = clock
        self._mtime_ns: int | None = None
        self._checked_at = clock()
        if self.path is None:
            self._tiers: dict[str, Tier] = dict(DEFAULT_TIERS)
        else:
            self._mtime_ns = self.path.stat().st_mtime_ns
            self._tiers = load_tiers(self.path)

    @property
    def tiers(self) -> dict[str, Tier]:
        self._maybe_reload()
        return dict(self._tiers)

    def get(self, name: str) -> Tier | None:
        self._maybe_reload()
        return self._tiers.get(name)

    def _maybe_reload(self) -> None:
        if self.path is None or self._clock() - self._checked_at < self.check_interval_s:
            return
        self._checked_at = self._clock()
        try:
            mtime = self.path.stat().st_mtime_ns
            if mtime == self._mtime_ns:
                return
            self._mtime_ns = mtime
            self._tiers = load_tiers(self.path)
        except (OSError, ValueError) as exc:
            self.last_error = str(exc)
            log.warning("tier_reload_failed", path=str(self.path), error=self.last_error)
            return
        self.last_error = None
        log.info("tiers_reloaded", path=str(self.path), tiers=sorted(self._tiers))
