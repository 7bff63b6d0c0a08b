"""Nothing a user sends or gets back reaches a log: a canary string goes through every RPC of the router and of a
worker, in success and failure paths, with every process at debug level (gRPC's own verbosity too), and must not
appear in any log line, in any case."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from protos.llamagrid.worker.v1 import worker_pb2 as wpb
from protos.llamagrid.worker.v1 import worker_pb2_grpc as wpb_grpc
from ratelimit.redis_server import RedisServer
from tests.service.router_harness import auth, create_keys
from worker.launch import start_worker

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
def cluster(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("privacy")
    worker_log = tmp / "worker.log"
    router_log = tmp / "router.log"
    with open(worker_log, "wb") as log:
        worker = start_worker(tiny_model_dir, "--kv-cache-tokens", "4096", "--num-threads", "1", "--log-level",
                              "debug", env=DEBUG_ENV, stderr=log)
    router = None
    try:
        with RedisServer() as redis_server:
            keys = create_keys(redis_server.url, {"pro": ("pro", []), "one": ("one", [])})
            tiers = tmp / "tiers.toml"
            tiers.write_text(TIERS)
            port_file = tmp / "router.port"
            with open(router_log, "wb") as log:
                router = subprocess.Popen(
                    [sys.executable, "-m", "router", "--workers", worker.address, "--port", "0", "--port-file",
                     str(port_file), "--redis-url", redis_server.url, "--tiers", str(tiers), "--log-level", "debug"],
                    env={**os.environ, **DEBUG_ENV}, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 30
            while not port_file.exists():
                assert router.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            address = f"127.0.0.1:{port_file.read_text()}"
            with grpc.insecure_channel(address) as ch:
                stub = pb_grpc.InferenceStub(ch)
                deadline = time.monotonic() + 30
                while True:
                    try:
                        stub.CountTokens(pb.CountTokensRequest(text="x"), metadata=auth(keys["pro"]), timeout=5)
                        break
                    except grpc.RpcError:
                        assert time.monotonic() < deadline
                        time.sleep(0.1)
            yield {"router": address, "worker": worker.address, "keys": keys, "logs": [worker_log, router_log],
                   "router_proc": router}
    finally:
        if router is not None and router.poll() is None:
            router.send_signal(signal.SIGTERM)
            router.wait(30)
        worker.stop()


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
        "unknown_model": _call(lambda: stub.Generate(pb.GenerateRequest(model=CANARY, inputs=[PROMPT], parameters=ok),
                                                     metadata=metadata, timeout=30)),
        "deadline": _call(lambda: stub.GenerateStream(pb.GenerateRequest(inputs=[PROMPT], parameters=long_stream),
                                                      metadata=metadata, timeout=0.5)),
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
    return out


def test_no_user_text_in_any_log(cluster):
    keys = cluster["keys"]
    with grpc.insecure_channel(cluster["router"]) as ch:
        codes = _exercise(pb_grpc.InferenceStub(ch), auth(keys["pro"]), auth(f"lg_{CANARY}_{CANARY}"),
                          auth(keys["one"]))
    assert codes["generate"] == codes["stream"] == codes["chat"] == codes["count"] == grpc.StatusCode.OK
    assert codes["invalid_params"] == codes["too_long"] == grpc.StatusCode.INVALID_ARGUMENT
    assert codes["unknown_model"] == grpc.StatusCode.NOT_FOUND
    assert codes["deadline"] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert codes["bad_key"] == grpc.StatusCode.UNAUTHENTICATED
    assert codes["rate_limited"] == grpc.StatusCode.RESOURCE_EXHAUSTED
    with grpc.insecure_channel(cluster["worker"]) as ch:  # the worker's own public API and its internal one
        direct = _exercise(pb_grpc.InferenceStub(ch), (), None, None)
        assert direct["generate"] == grpc.StatusCode.OK and direct["invalid_params"] == grpc.StatusCode.INVALID_ARGUMENT
        job = wpb.Job(request_id="privacy", text=PROMPT, parameters=pb.SamplingParameters(max_new_tokens=4),
                      resume_token_ids=[5, 6])
        assert list(wpb_grpc.WorkerStub(ch).Generate(iter([wpb.WorkerRequest(job=job)]), timeout=30))
    time.sleep(1.0)  # let the last log lines land
    for path in cluster["logs"]:
        text = path.read_text(errors="replace")
        assert text.count("\n") > 20, f"{path.name}: suspiciously few log lines"
        assert CANARY.lower() not in text.lower(), f"{path.name} contains user text"
