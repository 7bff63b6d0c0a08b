"""Workers for the gRPC tests of this package.

Real workers (tiny model, real processes) are few and shared by the whole session: a pair the end-to-end tests put
a router in front of (the first is also `worker_process`, the worker of the worker-contract tests), and one that
requires the internal token and logs at debug level with gRPC's own debug output. Router logic is tested against
scripted fake workers (tests/support/fake_worker.py), started in milliseconds per test or per module.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from common.internal_auth import INTERNAL_TOKEN_ENV
from common.ports import free_port
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
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
    """Two real tiny workers (started in parallel), each with /metrics; no test kills or stops them."""
    workers = start_real_workers(tiny_model_dir, worker_logs, *REAL_WORKER_ARGS,
                                 metrics_ports=[free_port(), free_port()])
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
def inference(channel):
    return pb_grpc.InferenceStub(channel)


@pytest.fixture()
def internal(channel):
    return wpb_grpc.WorkerStub(channel)


@pytest.fixture(scope="session")
def token_worker(tiny_model_dir, tmp_path_factory) -> Iterator[RealWorker]:
    """A real worker that refuses calls without INTERNAL_TOKEN, at debug level, gRPC's own logging at debug too."""
    log = tmp_path_factory.mktemp("token-worker") / "worker.stderr"
    (worker,) = start_real_workers(tiny_model_dir, [log], "--kv-cache-tokens", "4096", "--num-threads", "1",
                                   "--log-level", "debug",
                                   env={INTERNAL_TOKEN_ENV: INTERNAL_TOKEN, "GRPC_VERBOSITY": "debug"})
    yield worker
    worker.stop()


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
