"""A real worker process on the tiny model, shared by the gRPC tests of this package."""

from __future__ import annotations

import grpc
import pytest

from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from worker.launch import start_worker


@pytest.fixture(scope="session")
def worker_log(tmp_path_factory):
    return tmp_path_factory.mktemp("worker-log") / "worker.stderr"


@pytest.fixture(scope="session")
def worker_process(tiny_model_dir, worker_log):
    with open(worker_log, "wb") as log:
        proc = start_worker(tiny_model_dir, "--kv-cache-tokens", "8192", "--max-num-seqs", "32",
                            "--log-level", "debug", "--num-threads", "2", stderr=log)
    yield proc
    proc.stop()


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
