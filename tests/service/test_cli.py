"""The README's run command: `llamagrid up` generates the tiny model, starts Redis, two supervised replicas and a
router, and streams a demo chat through the router; every process it started is gone afterwards."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def test_up_demo_only(tmp_path):
    env = {**os.environ, "LLAMAGRID_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "up", "--demo-only", "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "starting 2 supervised worker replica(s) of tiny-llama-2-chat" in proc.stdout
    assert "router serving llamagrid.v1.Inference on 127.0.0.1:" in proc.stdout
    assert "[finish=LENGTH prompt_tokens=" in proc.stdout
    key = re.search(r"API key  (lg_\S+)", proc.stdout)
    assert key and "LLAMAGRID_API_KEY=" + key.group(1) in proc.stdout
    assert (tmp_path / "tiny-llama-2-chat" / "config.json").exists()
    assert not _processes_mentioning(str(tmp_path)), "llamagrid up left processes behind"


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_make_tiny_model_command(tmp_path):
    out = tmp_path / "m"
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "make-tiny-model", str(out), "--seed", "3",
                           "--layers", "1", "--kv-heads", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
