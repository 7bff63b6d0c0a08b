"""bench/gpu.py --dry-run: every phase of the GPU benchmark at tiny sizes on CPU, and the report's keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_bench_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["config"]["dry_run"] and report["config"]["weights"] == "disk"
    assert report["bandwidth"]["bytes_per_s"] > 0
    assert set(report["shapes"]) == {"llama2-7b", "llama2-70b-tp8-rank"}
    seven = report["shapes"]["llama2-7b"]
    for phase in ("build", "logits", "hf_decode", "hf_throughput", "decode", "throughput"):
        assert phase in seven and "error" not in seven[phase] and "skipped" not in seven[phase], (phase, seven[phase])
    assert seven["logits"]["pass"] and seven["logits"]["top1_agreement"] == 1.0
    assert seven["logits"]["max_abs_logprob_diff"] < 1e-3  # float32 on CPU
    batches = seven["decode"]["batches"]
    assert set(batches) == {"1", "2", "4", "1_eager", "4_eager", "1_flex", "4_flex"}
    assert batches["4_flex"]["attention"] == "flex" and batches["4_eager"]["attention"] == "gather"
    assert all(b["ms_per_step"] > 0 and b["floor_ms"] > 0 and b["ratio_to_floor"] > 0 for b in batches.values())
    assert seven["throughput"]["completed"] == seven["throughput"]["requests"] == 8
    assert seven["throughput"]["output_tokens"] == 8 * 8 and seven["throughput"]["errors"] == 0
    assert seven["hf_throughput"]["tokens_per_s"] > 0
    assert set(seven["hf_decode"]) == {"eager_b1", "static_compiled_b4", "phase_s"}
    rank = report["shapes"]["llama2-70b-tp8-rank"]
    assert rank["logits"]["pass"] and "error" not in rank["decode"]
    names = [c["name"] for c in report["checks"]]
    assert len(names) == 4 and all(c["pass"] is not None for c in report["checks"])
    assert "PASS" in proc.stdout or "FAIL" in proc.stdout
    assert "decode attention, llama2-7b batch 4: flex" in proc.stdout
