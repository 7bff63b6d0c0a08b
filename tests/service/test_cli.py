"""The README's run command: `llamagrid up` generates the tiny model, starts Redis, two supervised replicas and a
router, and streams a demo chat through the router; every process it started is gone afterwards. Each of those
processes serves Prometheus /metrics on a port it prints."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

METRICS_LINE = re.compile(r"^  (?:metrics)?\s+(router|worker\d+(?: supervisor)?)\s+(http://127\.0\.0\.1:\d+/metrics)$",
                          re.M)


def _metrics_urls(stdout: str) -> dict[str, str]:
    return dict(METRICS_LINE.findall(stdout))


def _check_started(stdout: str, replicas: int) -> dict[str, str]:
    """What `llamagrid up` prints once its cluster serves and the demo chat ran: the metrics URLs by process."""
    assert f"starting {replicas} supervised worker replica(s) of tiny-llama-2-chat" in stdout
    assert "router serving llamagrid.v1.Inference on 127.0.0.1:" in stdout
    assert "[finish=LENGTH prompt_tokens=" in stdout
    key = re.search(r"API key  (lg_\S+)", stdout)
    assert key and "LLAMAGRID_API_KEY=" + key.group(1) in stdout
    urls = _metrics_urls(stdout)
    names = {"router", *(f"worker{i}" for i in range(replicas)), *(f"worker{i} supervisor" for i in range(replicas))}
    assert set(urls) == names, stdout
    assert len(set(urls.values())) == len(names)
    return urls


def test_up_demo_only(tmp_path):
    """--demo-only: the demo chat, then every process stopped and status 0 (one replica: the two-replica cluster
    is the next test's; two router processes on one port: the next test runs one)."""
    env = {**os.environ, "LLAMAGRID_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "llamagrid", "up", "--demo-only", "--port", "0", "--http-port", "0",
                           "--replicas", "1", "--router-processes", "2"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check_started(proc.stdout, replicas=1)
    assert re.search(r"router serving llamagrid\.v1\.Inference on 127\.0\.0\.1:\d+ with 2 processes", proc.stdout)
    assert (tmp_path / "tiny-llama-2-chat" / "config.json").exists()
    assert not _processes_mentioning(str(tmp_path)), "llamagrid up left processes behind"


def test_up_serves_metrics_until_ctrl_c(tmp_path):
    """`llamagrid up` (no --demo-only): while it serves, the printed router /metrics has counted the demo chat and
    the workers' and supervisors' endpoints answer; Ctrl-C (SIGINT) then stops everything with status 0."""
    env = {**os.environ, "LLAMAGRID_HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "llamagrid", "up", "--port", "0", "--http-port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    stdout, deadline = "", time.monotonic() + 300
    try:
        while "serving; Ctrl-C stops every process" not in stdout:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"llamagrid up ended early: {stdout}{proc.stderr.read()[-2000:]}"
            stdout += line
        urls = _check_started(stdout, replicas=2)
        router = _scrape(urls["router"])
        chat = {"method": "/llamagrid.v1.Inference/Chat", "code": "OK"}
        assert _value(router, "llamagrid_router_requests_total", chat) == 1, "the demo chat"
        assert _value(router, "llamagrid_router_completion_tokens_total", {"model": "tiny-llama-2-chat"}) > 0
        assert _value(router, "llamagrid_router_workers", {"model": "tiny-llama-2-chat", "healthy": "true"}) == 2
        finished = [_value(_scrape(urls[f"worker{i}"]), "llamagrid_worker_jobs_finished_total",
                           {"model": "tiny-llama-2-chat", "finish_reason": "LENGTH"}) for i in range(2)]
        assert sorted(finished) == [0, 1], "the demo chat's one turn ran on exactly one worker"
        for i in range(2):
            assert _value(_scrape(urls[f"worker{i} supervisor"]), "llamagrid_supervisor_group_starts_total", {}) == 1
        # the HTTP API is on, with the same key: an OpenAI client's chat completion
        import openai

        base = re.search(r"HTTP +(http://127\.0\.0\.1:\d+/v1)", stdout).group(1)
        key = re.search(r"API key +(lg_\S+)", stdout).group(1)
        reply = openai.OpenAI(base_url=base, api_key=key, max_retries=0).chat.completions.create(
            model="tiny-llama-2-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.usage.completion_tokens > 0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not _processes_mentioning(str(tmp_path)), "llamagrid up left processes behind"


def _value(text: str, name: str, labels: dict[str, str]) -> float:
    """The sample `name{labels}` of a Prometheus text exposition (0 when absent: a labelled counter not yet hit)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


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
    proc = subprocess.run([sys.executable, "-m", "llamagrid", "make-tiny-model", str(out), "--seed", "3",
                           "--layers", "1", "--kv-heads", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()


def test_up_metrics_switch():
    from llamagrid.cli import build_parser

    assert build_parser().parse_args(["up"]).metrics is True
    assert build_parser().parse_args(["up", "--no-metrics"]).metrics is False


def test_the_llamagrid_script_and_python_m_llamagrid_run_llamagrid_cli():
    import tomllib

    scripts = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"llamagrid": "llamagrid.cli:main"}
    proc = subprocess.run([sys.executable, "-m", "llamagrid", "up", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "--demo-only" in proc.stdout, proc.stderr
