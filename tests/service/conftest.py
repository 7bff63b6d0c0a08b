"""Workers for the gRPC tests of this package.

Real workers (tiny model, real processes) are few and shared by the whole session: a pair that the end-to-end tests
put a router in front of. The first is `worker_process`, the worker of the worker-contract tests; the second requires
the internal token and writes gRPC's own debug output to its log too (`token_worker`: the privacy and token tests).
Router logic is tested against scripted fake workers (tests/support/fake_worker.py), started in milliseconds per
test or per module.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from common.internal_auth import INTERNAL_TOKEN_ENV
from common.ports import free_port
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from tests.support.fake_worker import FakeFleet
from tests.support.workers import INTERNAL_TOKEN, RealWorker, start_real_workers

REAL_WORKER_ARGS = ("--kv-cache-tokens", "8192", "--max-num-seqs", "32", "--log-level", "debug", "--num-threads", "2")


# ---- real workers


@pytest.fixture(scope="session")
def worker_logs(tmp_path_factory):
    base = tmp_path_factory.mktemp("real-workers")
    return [base / f"worker{i}.stderr" for i in range(2)]


@pytest.fixture(scope="session")
def worker_log(worker_logs):
    """The stderr of `worker_process` (JSON lines)."""
    return worker_logs[0]


@pytest.fixture(scope="session")
def real_workers(tiny_model_dir, worker_logs) -> Iterator[list[RealWorker]]:
    """Two real tiny workers (started in parallel), each with /metrics; no test kills or stops them. The second
    refuses calls without INTERNAL_TOKEN (routers in front of both are given it) and runs with GRPC_VERBOSITY=debug."""
    workers = start_real_workers(tiny_model_dir, worker_logs, *REAL_WORKER_ARGS,
                                 metrics_ports=[free_port(), free_port()],
                                 envs=[{}, {INTERNAL_TOKEN_ENV: INTERNAL_TOKEN, "GRPC_VERBOSITY": "debug"}])
    yield workers
    for w in workers:
        w.stop()


@pytest.fixture(scope="session")
def worker_process(real_workers):
    """The first real worker (worker.launch.WorkerProcess)."""
    return real_workers[0].process


@pytest.fixture(scope="session")
def channel(worker_process):
    with grpc.insecure_channel(worker_process.address) as ch:
        yield ch


@pytest.fixture()
def internal(channel):
    return wpb_grpc.WorkerStub(channel)


@pytest.fixture(scope="session")
def token_worker(real_workers) -> RealWorker:
    """The real worker that refuses calls without INTERNAL_TOKEN (debug level, gRPC's own logging at debug too)."""
    return real_workers[1]


# ---- fake workers


@pytest.fixture()
def fakes() -> Iterator[FakeFleet]:
    fleet = FakeFleet()
    yield fleet
    fleet.stop_all()


@pytest.fixture(scope="module")
def module_fakes() -> Iterator[FakeFleet]:
    fleet = FakeFleet()
    yield fleet
    fleet.stop_all()
