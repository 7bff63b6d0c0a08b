"""Regenerate the Python stubs from the .proto files (run from the repository root)."""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_FILES = ("protos/llamagrid/v1/inference.proto", "protos/llamagrid/worker/v1/worker.proto")


def generate(root: Path, out: Path | None = None) -> None:
    """Run protoc with the repository root as include path, writing stubs next to the protos (or into out)."""
    import grpc_tools
    from grpc_tools import protoc

    out = out or root
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(root / p) for p in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd())
