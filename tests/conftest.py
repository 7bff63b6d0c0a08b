"""Shared fixtures: generated tiny checkpoints, in-process workers, a real worker process."""

from __future__ import annotations

from pathlib import Path

import pytest


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
