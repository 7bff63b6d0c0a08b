"""The README's run command: `llamagrid up` generates the tiny model, serves it and streams a demo chat."""

from __future__ import annotations

import os
import subprocess
import sys


def test_up_demo_only(tmp_path):
    env = {**os.environ, "LLAMAGRID_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "up", "--demo-only", "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "worker serving tiny-llama-2-chat on 127.0.0.1:" in proc.stdout
    assert "[finish=LENGTH prompt_tokens=" in proc.stdout
    assert (tmp_path / "tiny-llama-2-chat" / "config.json").exists()


def test_make_tiny_model_command(tmp_path):
    out = tmp_path / "m"
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "make-tiny-model", str(out), "--seed", "3",
                           "--layers", "1", "--kv-heads", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
