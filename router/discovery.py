"""Worker discovery for the router: a static list of host:port targets or one periodically re-resolved DNS name."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from typing import Protocol

import structlog

log = structlog.get_logger("router.discovery")

DNS_PREFIX = "dns:"


class Discovery(Protocol):
    """Anything that lists the current worker targets ("host:port", sorted, unique)."""

    async def targets(self) -> list[str]: ...


def _split_host_port(target: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port"; raise ValueError when malformed."""
    if target.startswith("["):
        host, sep, port = target[1:].partition("]:")
        if not sep or not host:
            raise ValueError(f"bad target {target!r}: expected [ipv6]:port")
        ipaddress.IPv6Address(host)
    else:
        host, sep, port = target.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError(f"bad target {target!r}: expected host:port")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad target {target!r}: port must be 1..65535")
    return host, int(port)


def format_target(host: str, port: int) -> str:
    """Join host and port as gRPC expects: IPv6 literals in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_targets(spec: str) -> list[str]:
    """Parse a comma-separated list of host:port (whitespace and empty items ignored); unique, in input order."""
    out: list[str] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        host, port = _split_host_port(item)
        target = format_target(host, port)
        if target not in out:
            out.append(target)
    return out


class StaticTargets:
    """A fixed list of targets."""

    def __init__(self, targets: list[str]) -> None:
        self._targets = sorted(set(targets))

    async def targets(self) -> list[str]:
        return list(self._targets)


class DnsTargets:
    """One DNS name with many A/AAAA records (a headless service), re-resolved at most every `interval_s`.

    `targets()` returns the cached result while it is fresh; a failed lookup keeps the last good result (and raises
    only when there has never been one), so a DNS blip does not empty the pool.
    """

    def __init__(self, name: str, port: int, interval_s: float = 5.0) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"port must be 1..65535, got {port}")
        self.name = name
        self.port = port
        self.interval_s = interval_s
        self._last: list[str] | None = None
        self._resolved_at = float("-inf")

    async def resolve(self) -> list[str]:
        """Look the name up now; sorted unique "ip:port" (IPv6 as "[ip]:port")."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.name, self.port, type=socket.SOCK_STREAM)
        return sorted({format_target(str(info[4][0]), self.port) for info in infos
                       if info[0] in (socket.AF_INET, socket.AF_INET6)})

    async def targets(self) -> list[str]:
        if self._last is not None and time.monotonic() - self._resolved_at < self.interval_s:
            return list(self._last)
        try:
            found = await self.resolve()
        except OSError as exc:
            if self._last is None:
                raise
            log.warning("dns_resolve_failed", name=self.name, error=str(exc), kept=len(self._last))
            self._resolved_at = time.monotonic()
            return list(self._last)
        if found != self._last:
            log.info("dns_targets", name=self.name, port=self.port, count=len(found))
        self._last, self._resolved_at = found, time.monotonic()
        return list(found)


def from_spec(spec: str, interval_s: float = 5.0) -> Discovery:
    """Build discovery from a flag: `dns:NAME:PORT` gives DnsTargets, else a comma-separated static list."""
    if spec.startswith(DNS_PREFIX):
        host, port = _split_host_port(spec[len(DNS_PREFIX):].lstrip("/"))
        return DnsTargets(host, port, interval_s)
    targets = parse_targets(spec)
    if not targets:
        raise ValueError("no worker targets given")
    return StaticTargets(targets)
