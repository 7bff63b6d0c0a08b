"""common.ports: ports for processes started later come from below the kernel's ephemeral range."""

from __future__ import annotations

import socket

from common import ports


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    picked = ports.free_ports(8)
    assert len(set(picked)) == 8
    below = ports._below_ephemeral()
    assert all(p in below for p in picked), (picked, below)
    for p in picked:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_falls_back_to_the_kernel_when_nothing_below_is_free(monkeypatch):
    monkeypatch.setattr(ports, "_below_ephemeral", lambda: range(0))
    port = ports.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
