"""Free TCP ports for processes started later (tests, `llamagrid up`, a supervisor without --port).

A port picked now and bound later by another process can be taken in between. Ports from the kernel's ephemeral
range (what bind(0) returns) are the ones most at risk: every outgoing connection and every other bind(0) on the
machine draws from that range, and gloo's rendezvous alone opens several. So ports are drawn at random from below
the ephemeral range (which nothing is handed automatically), checked free by binding them, and only when that
finds none, from the kernel."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10_000  # stay clear of well-known and commonly configured service ports
_TRIES = 64


def _below_ephemeral() -> range:
    try:
        low = int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    return range(_LOWEST, max(_LOWEST, low))


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free on `host` right now (held together while chosen, then released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    address = host.strip("[]")
    candidates = _below_ephemeral()
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            held.append(s)
            for _ in range(_TRIES if candidates else 0):
                try:
                    s.bind((address, random.choice(candidates)))
                    break
                except OSError:
                    continue
            else:
                s.bind((address, 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """One port free on `host` right now (see free_ports)."""
    return free_ports(1, host)[0]


def write_port_file(path: Path, port: int) -> None:
    """Publish the port a process serves on: written beside and renamed into place, so a reader polling for the
    file never sees it empty or half-written."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.replace(path)
