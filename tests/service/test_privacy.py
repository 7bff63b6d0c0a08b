"""Nothing a user sends or gets back reaches a log: a canary string goes through every RPC of the router, every
route of its HTTP edge, and every RPC of a worker's Worker API, in success and failure paths, with every process at
debug level (gRPC's own verbosity too), and must not appear in any log line, in any case. A real worker (it is its
logging that is checked), the session's one that requires the internal token, behind a real router process."""

from __future__ import annotations

import json
import os
import threading

import grpc
import pytest
import requests

from common.internal_auth import INTERNAL_TOKEN_ENV, token_metadata
from common.ports import free_port
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from tests.support.router import RouterProcess, auth, create_keys, wait_routable
from tests.support.waits import wait_until
from tests.support.workers import INTERNAL_TOKEN

CANARY = "Zq7canaryXw9"
PROMPT = f"please repeat {CANARY} and {CANARY.lower()} twice"
TIERS = """
[tiers.pro]
requests_per_minute = 6000
tokens_per_minute = 4000000

[tiers.one]
requests_per_minute = 1
tokens_per_minute = 100000
request_burst = 1
"""
DEBUG_ENV = {"GRPC_VERBOSITY": "debug"}


@pytest.fixture(scope="module")
def cluster(token_worker, redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("privacy")
    keys = create_keys(redis_server.url, {"pro": ("pro", []), "one": ("one", [])})
    tiers = tmp / "tiers.toml"
    tiers.write_text(TIERS)
    http_port = free_port()
    router = RouterProcess(tmp / "router.log", "--workers", token_worker.address, "--redis-url", redis_server.url,
                           "--tiers", str(tiers), "--log-level", "debug", "--http-port", str(http_port),
                           env={**os.environ, **DEBUG_ENV, INTERNAL_TOKEN_ENV: INTERNAL_TOKEN})
    try:
        wait_routable(router.address, keys["pro"])
        yield {"router": router, "worker": token_worker, "keys": keys, "http": f"http://127.0.0.1:{http_port}"}
    finally:
        router.stop()


def _call(fn) -> grpc.StatusCode:
    try:
        result = fn()
        if hasattr(result, "__iter__") and not isinstance(result, bytes | str):
            list(result)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def _exercise(stub, metadata, bad_key_metadata, one_key_metadata) -> dict[str, grpc.StatusCode]:
    """Every RPC with the canary in every user-controlled field we can reach, in success and failure paths."""
    ok = pb.SamplingParameters(max_new_tokens=6, temperature=0.0)
    stop = pb.SamplingParameters(max_new_tokens=6, temperature=0.8, seed=1, stop=[CANARY, "the"])
    bad = pb.SamplingParameters(max_new_tokens=6, temperature=-1.0, stop=[CANARY])
    messages = [pb.ChatMessage(role="system", content=f"system {CANARY}"), pb.ChatMessage(role="user", content=PROMPT)]
    chat_turn = pb.ChatRequest(turn=pb.ChatTurn(messages=messages, parameters=stop))
    long_stream = pb.SamplingParameters(max_new_tokens=500, temperature=0.0, ignore_eos=True)
    # a context's worth of tokens: several times the 0.1 s deadline even on an idle machine
    past_deadline = pb.SamplingParameters(max_new_tokens=3000, temperature=0.0, ignore_eos=True)
    bad_schema = pb.SamplingParameters(json_schema=f'{{"type": "{CANARY}"}}')
    schema = pb.SamplingParameters(max_new_tokens=24, logprobs=3, json_schema=json.dumps(
        {"type": "object", "properties": {CANARY: {"enum": [CANARY]}}, "required": [CANARY]}))
    out = {
        "generate": _call(lambda: stub.Generate(pb.GenerateRequest(inputs=[PROMPT, CANARY], parameters=ok),
                                                metadata=metadata, timeout=30)),
        "generate_stop": _call(lambda: stub.Generate(pb.GenerateRequest(inputs=[PROMPT], parameters=stop),
                                                     metadata=metadata, timeout=30)),
        "stream": _call(lambda: stub.GenerateStream(pb.GenerateRequest(inputs=[PROMPT], parameters=ok),
                                                    metadata=metadata, timeout=30)),
        "chat": _call(lambda: stub.Chat(iter([chat_turn]), metadata=metadata, timeout=30)),
        "count": _call(lambda: stub.CountTokens(pb.CountTokensRequest(text=PROMPT), metadata=metadata, timeout=30)),
        "count_chat": _call(lambda: stub.CountTokens(pb.CountTokensRequest(chat=pb.ChatTurn(messages=messages)),
                                                     metadata=metadata, timeout=30)),
        "invalid_params": _call(lambda: stub.Generate(pb.GenerateRequest(inputs=[PROMPT], parameters=bad),
                                                      metadata=metadata, timeout=30)),
        "too_long": _call(lambda: stub.Generate(pb.GenerateRequest(inputs=[PROMPT * 3000], parameters=ok),
                                                metadata=metadata, timeout=30)),
        "bad_schema": _call(lambda: stub.Generate(pb.GenerateRequest(inputs=[PROMPT], parameters=bad_schema),
                                                  metadata=metadata, timeout=30)),
        "schema": _call(lambda: stub.GenerateStream(pb.GenerateRequest(inputs=[PROMPT], parameters=schema),
                                                    metadata=metadata, timeout=30)),
        "unknown_model": _call(lambda: stub.Generate(pb.GenerateRequest(model=CANARY, inputs=[PROMPT], parameters=ok),
                                                     metadata=metadata, timeout=30)),
        "deadline": _call(lambda: stub.GenerateStream(pb.GenerateRequest(inputs=[PROMPT], parameters=past_deadline),
                                                      metadata=metadata, timeout=0.1)),
    }
    stream = stub.GenerateStream(pb.GenerateRequest(inputs=[PROMPT], parameters=long_stream), metadata=metadata,
                                 timeout=30)
    next(stream)
    stream.cancel()
    out["cancelled"] = grpc.StatusCode.CANCELLED

    cancel_now = threading.Event()

    def chat_then_cancel():
        yield pb.ChatRequest(turn=pb.ChatTurn(messages=messages, parameters=long_stream))
        cancel_now.wait(30)
        yield pb.ChatRequest(cancel=pb.CancelTurn())

    for event in stub.Chat(chat_then_cancel(), metadata=metadata, timeout=30):
        cancel_now.set()
        if event.HasField("end"):
            break
    out["chat_cancel"] = grpc.StatusCode.OK
    if bad_key_metadata is not None:
        out["bad_key"] = _call(lambda: stub.Generate(pb.GenerateRequest(inputs=[PROMPT], parameters=ok),
                                                     metadata=bad_key_metadata, timeout=30))
        out["x_request_id"] = _call(lambda: stub.Generate(  # a request id is echoed into logs only when well-formed
            pb.GenerateRequest(inputs=[PROMPT], parameters=ok), metadata=(*metadata, ("x-request-id", CANARY * 20)),
            timeout=30))
    if one_key_metadata is not None:
        for _ in range(2):
            out["rate_limited"] = _call(lambda: stub.Generate(pb.GenerateRequest(inputs=[PROMPT], parameters=ok),
                                                              metadata=one_key_metadata, timeout=30))
    out["last"] = _call(lambda: stub.CountTokens(pb.CountTokensRequest(text=PROMPT), timeout=30,
                                                 metadata=(*metadata, ("x-request-id", "privacy-last"))))
    return out


def _exercise_http(url: str, key: str) -> dict[str, int]:
    """Every HTTP route with the canary in what a client controls: prompts, messages, stop strings, the user field,
    field names and values that are refused, a body that is not JSON, a bad key, a stream the client leaves."""
    good = {"authorization": f"Bearer {key}"}
    messages = [{"role": "system", "content": f"system {CANARY}"}, {"role": "user", "content": PROMPT}]
    chat = {"model": "", "messages": messages, "max_tokens": 6, "temperature": 0, "stop": [CANARY], "user": CANARY}

    def post(path: str, body=None, headers=good, data=None) -> int:
        resp = requests.post(f"{url}{path}", json=body, data=data, headers=headers, timeout=30)
        resp.content  # noqa: B018 - read to its end
        return resp.status_code

    model = requests.get(f"{url}/v1/models", headers=good, timeout=30).json()["data"][0]["id"]
    chat["model"] = model
    out = {
        "chat": post("/v1/chat/completions", chat),
        "chat_stream": post("/v1/chat/completions", {**chat, "stream": True,
                                                     "stream_options": {"include_usage": True}}),
        "completions": post("/v1/completions", {"model": model, "prompt": [PROMPT, CANARY], "max_tokens": 6}),
        "predict": post(f"/{model}/v1/predict", {"inputs": [PROMPT], "parameters": {"max_new_tokens": 6}},
                        headers={"authorization": key}),
        "predict_stream": post(f"/{model}/v1/predict_stream", {"inputs": [PROMPT], "parameters": {"stop": CANARY}}),
        "bad_role": post("/v1/chat/completions", {**chat, "messages": [{"role": CANARY, "content": PROMPT}]}),
        "bad_part": post("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [
            {"type": CANARY, "text": PROMPT}]}]}),
        "bad_type": post("/v1/chat/completions", {**chat, "max_tokens": CANARY}),
        "bad_parameter": post(f"/{model}/v1/predict", {"inputs": [PROMPT], "parameters": {CANARY: CANARY}}),
        "bad_json": post("/v1/completions", data=f'{{"prompt": "{CANARY}'.encode(),
                         headers={**good, "content-type": "application/json"}),
        "unknown_model": post(f"/{CANARY}/v1/predict", {"inputs": [PROMPT]}),
        "bad_key": post("/v1/completions", {"model": model, "prompt": PROMPT},
                        headers={"authorization": f"Bearer lg_{CANARY}_{CANARY}"}),
        "no_route": post(f"/v1/{CANARY}", {"prompt": PROMPT}),
        "request_id": post("/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 2},
                           headers={**good, "x-request-id": CANARY * 20}),
    }
    with requests.post(f"{url}/v1/completions", stream=True, headers=good, timeout=30, json={
            "model": model, "prompt": PROMPT, "max_tokens": 500, "stream": True, "ignore_eos": True}) as resp:
        next(line for line in resp.iter_lines() if line)  # then the client leaves
    return out


def test_no_user_text_in_any_log(cluster):
    keys = cluster["keys"]
    http = _exercise_http(cluster["http"], keys["pro"])
    assert http["chat"] == http["chat_stream"] == http["completions"] == http["predict"] == 200
    assert http["predict_stream"] == http["request_id"] == 200
    assert http["bad_role"] == http["bad_part"] == http["bad_type"] == http["bad_parameter"] == 400
    assert http["bad_json"] == 400 and http["bad_key"] == 401
    assert http["unknown_model"] == http["no_route"] == 404
    with grpc.insecure_channel(cluster["router"].address) as ch:
        codes = _exercise(pb_grpc.InferenceStub(ch), auth(keys["pro"]), auth(f"lg_{CANARY}_{CANARY}"),
                          auth(keys["one"]))
    assert codes["generate"] == codes["stream"] == codes["chat"] == codes["count"] == grpc.StatusCode.OK
    assert codes["invalid_params"] == codes["too_long"] == codes["bad_schema"] == grpc.StatusCode.INVALID_ARGUMENT
    assert codes["schema"] == grpc.StatusCode.OK
    assert codes["unknown_model"] == grpc.StatusCode.NOT_FOUND
    assert codes["deadline"] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert codes["bad_key"] == grpc.StatusCode.UNAUTHENTICATED
    assert codes["rate_limited"] == grpc.StatusCode.RESOURCE_EXHAUSTED
    with grpc.insecure_channel(cluster["worker"].address) as ch:  # the worker's own API
        direct = _exercise_worker(wpb_grpc.WorkerStub(ch))
    assert direct["run"] == direct["generate"] == direct["chat"] == direct["count"] == grpc.StatusCode.OK
    assert direct["invalid_params"] == direct["bad_role"] == grpc.StatusCode.INVALID_ARGUMENT
    assert direct["unknown_model"] == grpc.StatusCode.NOT_FOUND
    assert direct["deadline"] == grpc.StatusCode.DEADLINE_EXCEEDED
    # the last lines of both: the router's last call and the worker's last job are logged as finished
    router = cluster["router"]
    router.wait_event("request_finished", where=lambda e: e.get("request_id") == "privacy-last")
    wait_until(lambda: [e for e in cluster["worker"].events("request_finished") if e["request_id"] == "privacy-last"],
               "the worker's last job to be logged")
    for path in (cluster["worker"].log_path, router.log_path):
        text = path.read_text(errors="replace")
        assert text.count("\n") > 20, f"{path.name}: suspiciously few log lines"
        assert CANARY.lower() not in text.lower(), f"{path.name} contains user text"
    assert router.events("request_finished") and any(e.get("method") == "POST /v1/chat/completions"
                                                       for e in router.events("request_finished"))


def _exercise_worker(stub: wpb_grpc.WorkerStub) -> dict[str, grpc.StatusCode]:
    """Every Worker RPC with the canary in every field a router passes through, in success and failure paths."""
    md = token_metadata(INTERNAL_TOKEN)
    ok = pb.SamplingParameters(max_new_tokens=6, temperature=0.0)
    stop = pb.SamplingParameters(max_new_tokens=6, temperature=0.8, seed=1, stop=[CANARY, "the"])
    bad = pb.SamplingParameters(max_new_tokens=6, temperature=-1.0, stop=[CANARY])
    long = pb.SamplingParameters(max_new_tokens=500, temperature=0.0, ignore_eos=True)
    # a context's worth of tokens: several times the 0.1 s deadline even on an idle machine
    past_deadline = pb.SamplingParameters(max_new_tokens=3000, temperature=0.0, ignore_eos=True)
    messages = [pb.ChatMessage(role="system", content=f"system {CANARY}"), pb.ChatMessage(role="user", content=PROMPT)]

    def job(request_id: str, params: pb.SamplingParameters = ok, **fields) -> wpb.Job:
        out = wpb.Job(request_id=request_id, parameters=params, tenant="privacy", **fields)
        if "chat" not in fields and "token_ids" not in fields:
            out.text = PROMPT
        return out

    def run(j: wpb.Job, timeout: float = 30):
        return _call(lambda: stub.Run(j, metadata=md, timeout=timeout))

    chat_job = job("privacy-chat", stop, chat=wpb.ChatMessages(messages=messages))
    out = {
        "run": run(job("privacy-run")),
        "run_stop": run(job("privacy-stop", stop)),
        "generate": _call(lambda: stub.Generate(iter([wpb.WorkerRequest(job=job("privacy-gen"))]), metadata=md,
                                                timeout=30)),
        "chat": run(chat_job),
        "count": _call(lambda: stub.CountTokens(pb.CountTokensRequest(text=PROMPT), metadata=md, timeout=30)),
        "count_chat": _call(lambda: stub.CountTokens(pb.CountTokensRequest(chat=pb.ChatTurn(messages=messages)),
                                                     metadata=md, timeout=30)),
        "invalid_params": run(job("privacy-bad", bad)),
        "bad_role": run(job("privacy-role", chat=wpb.ChatMessages(messages=[pb.ChatMessage(role=CANARY,
                                                                                         content=PROMPT)]))),
        "too_long": run(job("privacy-long", text=PROMPT * 3000)),
        "unknown_model": run(job("privacy-model", model=CANARY)),
        "deadline": run(job("privacy-deadline", past_deadline), timeout=0.1),
        "resumed": run(job("privacy-resume", pb.SamplingParameters(max_new_tokens=4), resume_token_ids=[5, 6])),
    }
    call = stub.Run(job("privacy-cancelled", long), metadata=md, timeout=30)
    next(call)
    call.cancel()
    out["cancelled"] = grpc.StatusCode.CANCELLED

    cancel_now = threading.Event()

    def job_then_cancel():
        yield wpb.WorkerRequest(job=job("privacy-cancel-msg", long))
        cancel_now.wait(30)
        yield wpb.WorkerRequest(cancel=wpb.Cancel())

    for event in stub.Generate(job_then_cancel(), metadata=md, timeout=30):
        cancel_now.set()
        if event.HasField("finished"):
            break
    out["cancel_message"] = grpc.StatusCode.OK
    out["last"] = run(job("privacy-last"))
    return out
