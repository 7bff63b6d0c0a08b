"""HTTP streams as they happen, against fake worker processes: the first event reaches the client long before the
last token exists; a worker SIGKILLed mid-stream is failed over with no text repeated or lost; a client that hangs
up stops its job on the worker; metrics count requests by route and status."""

from __future__ import annotations

import time
import urllib.request

import openai
import pytest
import requests

from common.ports import free_port
from protos.llamagrid.v1 import inference_pb2 as pb
from tests.support.fake_model import Script, encode_text, reply, token_text
from tests.support.fake_process import FakeWorkerProcess
from tests.support.router import config_for, new_keys, serve_router
from tests.support.waits import wait_until

SLOW = Script(token_delay_s=0.02)  # 50 tokens: a second


@pytest.fixture(scope="module")
def key(redis_server) -> str:
    return new_keys(redis_server.url, {"pro": "pro"}, prefix="http-stream")["pro"].plaintext


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    base = tmp_path_factory.mktemp("http-stream-workers")
    started = [FakeWorkerProcess(base / f"w{i}.stderr", SLOW) for i in range(2)]
    yield started
    for w in started:
        w.stop()


@pytest.fixture(scope="module")
def router(workers, redis_server):
    config = config_for(workers, redis_server.url, http_port=0, metrics_port=free_port(), failover_wait_s=10.0)
    with serve_router(config, num_workers=2, health_timeout_s=1.0) as handle:
        handle.metrics_port = config.metrics_port
        yield handle


def _client(router, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.http_url}/v1", api_key=key, max_retries=0, timeout=60)


def _expected_text(prompt: str, n: int) -> str:
    params = pb.SamplingParameters(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    return "".join(token_text(t) for t in reply(encode_text(prompt), params, n))


def test_the_first_event_arrives_long_before_the_last_token(router, key):
    started = time.monotonic()
    stream = _client(router, key).completions.create(model="fake-llama", prompt="count slowly", max_tokens=50,
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True})
    arrivals, text = [], []
    for chunk in stream:
        arrivals.append(time.monotonic() - started)
        text.append(chunk.choices[0].text)
    assert "".join(text) == _expected_text("count slowly", 50)
    # 50 tokens 20 ms apart: the last one is made at least 0.98 s after the first
    assert arrivals[0] + 0.9 < arrivals[-1], (arrivals[0], arrivals[-1])
    assert len(arrivals) >= 10  # (deltas arrive as they come, not all at the end)


def test_a_worker_killed_mid_stream_is_failed_over_with_the_same_text(router, key, workers, tmp_path):
    request_id = f"http-failover-{time.monotonic_ns()}"
    prompt = "tell me a long story"
    stream = _client(router, key).chat.completions.create(
        model="fake-llama", messages=[{"role": "user", "content": prompt}], max_tokens=60, temperature=0,
        stream=True, extra_body={"ignore_eos": True}, extra_headers={"x-request-id": request_id})
    text, killed = [], None
    for chunk in stream:
        text.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        if killed is None and len("".join(text).split()) >= 10:
            [killed] = [w for w in workers if any(e["request_id"].startswith(request_id)
                                                  for e in w.events("job_started"))]
            killed.kill()
    assert killed is not None and killed.proc.returncode == -9
    survivor = next(w for w in workers if w is not killed)
    resumed = [e for e in survivor.events("job_started") if e["request_id"].startswith(request_id)]
    assert resumed and resumed[0]["resume_token_ids"], "the stream was not resumed on the other worker"
    # the text is the one of an uninterrupted run: nothing repeated, nothing lost
    from tests.support.fake_model import encode_chat

    params = pb.SamplingParameters(max_new_tokens=60, temperature=0.0, ignore_eos=True)
    ids = reply(encode_chat([pb.ChatMessage(role="user", content=prompt)]), params, 60)
    assert "".join(text) == "".join(token_text(t) for t in ids)
    # the killed worker comes back (as its supervisor would start it again) for the tests after this one
    workers[workers.index(killed)] = FakeWorkerProcess(tmp_path / "again.stderr", SLOW, port=killed.port)
    router.wait_health(killed.address, True)


def test_a_client_that_hangs_up_stops_its_job(router, key, workers):
    request_id = f"http-hangup-{time.monotonic_ns()}"
    body = {"model": "fake-llama", "prompt": "go on and on", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with requests.post(f"{router.http_url}/v1/completions", json=body, stream=True, timeout=30,
                       headers={"authorization": f"Bearer {key}", "x-request-id": request_id}) as resp:
        assert resp.status_code == 200
        next(line for line in resp.iter_lines() if line)  # under way; then the client closes the connection

    def ended():
        return [e for w in workers for e in w.events("job_ended") if e["request_id"].startswith(request_id)]

    wait_until(ended, "the job to end on its worker after the client left", 10)
    assert ended()[0]["outcome"] in ("cancelled", "call_cancelled"), ended()
    assert ended()[0]["num_sent"] < 2000


def test_http_requests_are_counted_by_route_and_status(router, key):
    client = _client(router, key)
    client.models.list()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="fake-llama", prompt="x", temperature=9)
    with urllib.request.urlopen(f"http://127.0.0.1:{router.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert 'llamagrid_router_http_requests_total{route="GET /v1/models",status="200"}' in text
    assert 'llamagrid_router_http_requests_total{route="POST /v1/completions",status="400"}' in text

