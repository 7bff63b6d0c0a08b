"""Fixtures of every test package: generated tiny checkpoints and a redis-server per module."""

from __future__ import annotations

from pathlib import Path

import pytest

from ratelimit.redis_server import RedisServer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The default tiny Llama-2-chat checkpoint (MHA, seed 0)."""
    from worker.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", seed=0)


@pytest.fixture(scope="session")
def tiny_gqa_model_dir(tmp_path_factory) -> Path:
    from worker.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-gqa") / "tiny-gqa", seed=1, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="session")
def tiny_rope_model_dir(tmp_path_factory) -> Path:
    from worker.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-rope") / "tiny-rope", seed=2,
                           rope_scaling={"rope_type": "linear", "factor": 2.0})


@pytest.fixture(scope="module")
def redis_server():
    """A real redis-server on a free port for the module (it starts in milliseconds): routers of one module share
    its key store, buckets and router registry with no other module."""
    with RedisServer() as server:
        yield server
