"""WorkerPool and discovery against fake workers over real gRPC (one of them a process, killed with SIGKILL)."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest

from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from router.discovery import DnsTargets, StaticTargets, from_spec, parse_targets
from router.worker_pool import WorkerPool
from tests.support.fake_model import Script
from tests.support.fake_process import FakeWorkerProcess
from tests.support.waits import until


@pytest.fixture(scope="module")
def workers(module_fakes):
    """Two fake workers with a KV cache of 2048 tokens."""
    return module_fakes.start_many(2, lambda: Script(kv_capacity_tokens=2048))


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
            # the dead address was tried (and failed), not merely not yet reached
            await until(lambda: pool.channel(dead_address).get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                        "a failed connection attempt to the dead address")
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


def test_killed_worker_leaves_pool_quickly(workers, tmp_path):
    killed = FakeWorkerProcess(tmp_path / "killed.stderr")
    a, b = workers[0].address, killed.address

    async def body():
        pool = WorkerPool(StaticTargets([a, b]))
        await pool.start()
        try:
            assert await pool.wait_healthy(2, timeout_s=10)
            killed.kill()  # SIGKILL
            await until(lambda: not any(s.is_healthy for s in pool.snapshot() if s.address == b),
                        "the killed worker to leave the pool", timeout_s=2.0)
            model = pool.default_model()
            assert model is not None and pool.models() == {model: 1}
            for _ in range(5):
                assert pool.pick(model)[0].address == a
        finally:
            await pool.stop()

    try:
        asyncio.run(body())
    finally:
        killed.stop()
