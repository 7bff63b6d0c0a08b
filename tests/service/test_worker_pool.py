"""WorkerPool and discovery against real worker processes over real gRPC."""

from __future__ import annotations

import asyncio
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from router.discovery import DnsTargets, StaticTargets, from_spec, parse_targets
from router.worker_pool import WorkerPool
from worker.launch import start_worker

WORKER_ARGS = ("--kv-cache-tokens", "2048", "--num-threads", "1")


@pytest.fixture(scope="module")
def workers(tiny_model_dir):
    """Two tiny workers, started side by side; the last test kills the second."""
    with ThreadPoolExecutor(2) as ex:
        procs = list(ex.map(lambda _: start_worker(tiny_model_dir, *WORKER_ARGS), range(2)))
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def dead_address():
    """An address nothing listens on (a port bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class _Mutable:
    def __init__(self, targets: list[str]) -> None:
        self.current = targets

    async def targets(self) -> list[str]:
        return sorted(self.current)


def test_parse_targets():
    assert parse_targets("a:1, b:2,,a:1 ,") == ["a:1", "b:2"]
    assert parse_targets("[::1]:50051,10.0.0.1:7") == ["[::1]:50051", "10.0.0.1:7"]
    assert parse_targets("") == []
    for bad in ("a", "a:", ":5", "a:0", "a:70000", "a:x", "::1:5", "[zz]:5", "[::1]"):
        with pytest.raises(ValueError):
            parse_targets(bad)


def test_from_spec_and_dns_localhost():
    static = from_spec("b:2,a:1")
    assert isinstance(static, StaticTargets)
    assert asyncio.run(static.targets()) == ["a:1", "b:2"]
    dns = from_spec("dns:localhost:50051")
    assert isinstance(dns, DnsTargets) and (dns.name, dns.port) == ("localhost", 50051)
    with pytest.raises(ValueError):
        from_spec(" , ")

    async def body():
        found = await dns.resolve()
        cached = await dns.targets()
        return found, cached

    found, cached = asyncio.run(body())
    assert "127.0.0.1:50051" in found and found == sorted(set(found))
    assert cached == found


def test_pool_health_info_pick_and_leases(workers, dead_address):
    a, b = (w.address for w in workers)

    async def body():
        pool = WorkerPool(StaticTargets([a, b, dead_address]), load_interval_s=0.2)
        await pool.start()
        try:
            assert await pool.wait_healthy(2, timeout_s=15)
            await asyncio.sleep(0.3)  # give the dead address a few reconnect attempts
            states = {s.address: s for s in pool.snapshot()}
            assert set(states) == {a, b, dead_address}
            assert not states[dead_address].is_healthy
            for addr in (a, b):
                s = states[addr]
                assert s.is_healthy and s.model and s.kv_capacity_tokens == 2048 and s.max_num_seqs > 0
                assert s.num_total_blocks > 0 and s.num_in_flight == 0
            model = states[a].model
            assert pool.default_model() == model and pool.models() == {model: 2}

            picked, channel = pool.pick(model)
            assert picked.address in (a, b) and channel is pool.channel(picked.address)
            assert pool.pick(model, exclude=frozenset({a}))[0].address == b
            assert pool.pick(model, exclude=frozenset({a, b})) is None
            assert pool.pick("no-such-model") is None
            info = await pool.stub(a).Info(wpb.InfoRequest(), timeout=5)
            assert info.model == model

            base = states[a].num_pending_tokens
            lease = pool.acquire(a, 100)
            with pool.acquire(a, 20):
                s = {x.address: x for x in pool.snapshot()}[a]
                assert (s.num_in_flight, s.num_pending_tokens) == (2, base + 120)
            lease.release()
            lease.release()
            s = {x.address: x for x in pool.snapshot()}[a]
            assert (s.num_in_flight, s.num_pending_tokens) == (0, base)
            with pytest.raises(KeyError):
                pool.acquire("127.0.0.1:1", 1)
        finally:
            await pool.stop()

    asyncio.run(body())


def test_discovery_changes_add_and_close(workers):
    a, b = (w.address for w in workers)

    async def body():
        disc = _Mutable([a])
        pool = WorkerPool(disc, refresh_s=60)
        await pool.start()
        try:
            assert await pool.wait_healthy(1, timeout_s=10)
            disc.current = [b]
            await pool.refresh()
            assert pool.addresses() == [b]
            assert await pool.wait_healthy(1, timeout_s=10)
            assert [s.address for s in pool.snapshot() if s.is_healthy] == [b]
        finally:
            await pool.stop()
        assert pool.addresses() == []

    asyncio.run(body())


def test_killed_worker_leaves_pool_quickly(workers):
    """Runs last in this module: it kills the second worker."""
    a, b = (w.address for w in workers)

    async def body():
        pool = WorkerPool(StaticTargets([a, b]))
        await pool.start()
        try:
            assert await pool.wait_healthy(2, timeout_s=10)
            workers[1].proc.kill()
            t0 = time.monotonic()
            while any(s.is_healthy for s in pool.snapshot() if s.address == b):
                assert time.monotonic() - t0 < 2.0, "killed worker still healthy after 2 s"
                await asyncio.sleep(0.02)
            model = pool.default_model()
            assert model is not None and pool.models() == {model: 1}
            for _ in range(5):
                assert pool.pick(model)[0].address == a
        finally:
            await pool.stop()

    asyncio.run(body())
