"""The tenant-isolation setup: router processes at debug level with small per-call limits and tiers built to be
exhausted, in front of fake workers; every router's whole stderr must be JSON with nothing left behind."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc

from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from tests.support.router import RouterProcess, log_problems, wait_routable

TIERS = """
[tiers.gen]
requests_per_minute = 60000
tokens_per_minute = 10000000

[tiers.tiny]
requests_per_minute = 1
tokens_per_minute = 1000000
request_burst = 3

[tiers.small]
requests_per_minute = 1
tokens_per_minute = 50
request_burst = 3
token_burst = 50

[tiers.capped]
requests_per_minute = 60000
tokens_per_minute = 10000000
max_concurrent_requests = 2
max_chat_sessions = 2
"""
MAX_CHARS = 5000  # --max-request-chars of the routers here


class Router(RouterProcess):
    """A router process with a channel and stub to it, and the key it was probed with."""

    def __init__(self, tmp: Path, name: str, redis_url: str, worker: str, key: str, *extra: str) -> None:
        tiers = tmp / "tiers.toml"
        if not tiers.exists():
            tiers.write_text(TIERS)
        super().__init__(tmp / f"{name}.stderr", "--redis-url", redis_url, "--workers", worker, "--tiers", str(tiers),
                         "--log-level", "debug", "--max-request-chars", str(MAX_CHARS), *extra)
        self.key = key
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.InferenceStub(self.channel)


@contextlib.contextmanager
def routers(specs: dict[str, tuple]) -> Iterator[dict[str, Router]]:
    """Router(*args) per name, each routable before the block runs. On exit each is stopped with SIGTERM: it must
    exit 0, and its whole stderr must be JSON without a task or generator left behind."""
    out: dict[str, Router] = {}
    try:
        for name, args in specs.items():
            out[name] = Router(*args)
        for router in out.values():
            wait_routable(router.address, router.key, 60)
        yield out
    finally:
        for router in out.values():
            router.channel.close()
        codes = {name: router.stop() for name, router in out.items()}
    for name, router in out.items():
        problems = log_problems(router.log_text())
        assert not problems, f"router {name}'s stderr: {problems[:5]}"
    assert codes == dict.fromkeys(out, 0)
