"""The committed stubs are exactly what grpcio-tools generates from the committed .proto files."""

from __future__ import annotations

import shutil
from pathlib import Path

from protos.generate import PROTO_FILES, generate

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    for proto in PROTO_FILES:
        (tmp_path / proto).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / proto, tmp_path / proto)
    generate(tmp_path)
    stale = []
    for proto in PROTO_FILES:
        stem = proto.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            fresh = (tmp_path / f"{stem}{suffix}").read_text()
            committed = (ROOT / f"{stem}{suffix}").read_text()
            if fresh != committed:
                stale.append(f"{stem}{suffix}")
    assert not stale, f"stale stubs {stale}: run `python -m protos.generate` from the repository root"


def test_stubs_import_from_repository_root() -> None:
    from protos.llamagrid.v1 import inference_pb2, inference_pb2_grpc
    from protos.llamagrid.worker.v1 import worker_pb2, worker_pb2_grpc

    assert inference_pb2.DESCRIPTOR.package == "llamagrid.v1"
    assert worker_pb2.DESCRIPTOR.package == "llamagrid.worker.v1"
    assert hasattr(inference_pb2_grpc, "InferenceStub") and hasattr(worker_pb2_grpc, "WorkerStub")
