"""llamagrid.client (sync and async), the `llamagrid generate` / `llamagrid chat` commands and examples/rag_chat.py,
against the router in-process over real gRPC in front of a real worker process and redis-server; retries against
a fake server that fails on demand."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from llamagrid.client import (
    NO_RETRY,
    AsyncClient,
    ChatDelta,
    Client,
    RateLimited,
    RetryPolicy,
    TurnEnd,
    Unauthenticated,
    Unavailable,
    _retry_after_s,
    error_from_rpc,
    sampling_parameters,
)
from protos.llamagrid.v1 import inference_pb2 as pb
from protos.llamagrid.v1 import inference_pb2_grpc as pb_grpc
from router.config import RouterConfig
from tests.support.router import create_keys, router_in_thread

ROOT = Path(__file__).resolve().parents[2]
TIERS = """
[tiers.pro]
requests_per_minute = 6000
tokens_per_minute = 4000000

[tiers.slow]
requests_per_minute = 60
tokens_per_minute = 4000000
request_burst = 1
"""
GREEDY = dict(max_new_tokens=4, temperature=0.0)


@pytest.fixture(scope="module")
def keys(redis_server):
    return create_keys(redis_server.url, {"k": ("pro", []), "slow": ("slow", [])})


@pytest.fixture(scope="module")
def router(redis_server, worker_process, keys, tmp_path_factory):
    tiers = tmp_path_factory.mktemp("client-tiers") / "tiers.toml"
    tiers.write_text(TIERS)
    config = RouterConfig(port=0, workers=worker_process.address, redis_url=redis_server.url, tiers_path=tiers,
                          redis_timeout_s=0.5, failover_wait_s=2.0)
    with router_in_thread(config, num_workers=1, probe_key=keys["k"]) as address:
        yield address


@pytest.fixture()
def client(router, keys):
    with Client(router, api_key=keys["k"], timeout=60) as c:
        yield c


# ------------------------------------------------------------------------------------------------ sync, via router


def test_generate_single_and_batch(client):
    one = client.generate("hello", **GREEDY, ignore_eos=True)
    assert one.finish_reason == "LENGTH" and len(one.token_ids) == one.usage.completion_tokens == 4
    assert one.usage.prompt_tokens > 0
    batch = client.generate(["hello", "the cat sat"], **GREEDY, ignore_eos=True)
    assert len(batch) == 2 and batch[0].token_ids == one.token_ids  # greedy is deterministic


def test_generate_stream_chunks_add_up(client):
    chunks = list(client.generate_stream(["one", "two two"], max_new_tokens=5, temperature=0.0, ignore_eos=True))
    for i in (0, 1):
        mine = [c for c in chunks if c.index == i]
        last = [c for c in mine if c.finish_reason]
        assert len(last) == 1 and last[0].usage.completion_tokens == 5
        assert sum(len(c.token_ids) for c in mine) == 5
    text = "".join(c.text for c in chunks if c.index == 0)
    assert text == client.generate("one", max_new_tokens=5, temperature=0.0, ignore_eos=True).text


def test_chat_three_turns_keep_history_server_side(client):
    with client.chat(system="You are terse.", **GREEDY) as chat:
        ends = []
        for text in ("hi", "and then?", "thanks"):
            turn = chat.send(text)
            events = list(turn)
            assert isinstance(events[-1], TurnEnd) and all(isinstance(e, ChatDelta) for e in events[:-1])
            assert turn.text == "".join(e.text for e in events[:-1]) and turn.end is events[-1]
            ends.append(turn.end)
        for a, b in zip(ends, ends[1:], strict=False):  # each prompt holds the whole earlier conversation
            assert b.usage.prompt_tokens > a.usage.prompt_tokens + a.usage.completion_tokens
        assert [m.role for m in chat.history] == ["system", "user", "assistant", "user", "assistant", "user",
                                                  "assistant"]


def test_chat_cancel_ends_turn_cancelled_and_session_goes_on(client):
    with client.chat(max_new_tokens=1000, temperature=0.0, ignore_eos=True) as chat:
        turn = chat.send("talk")
        for event in turn:
            if isinstance(event, ChatDelta):
                turn.cancel()
        assert turn.end.finish_reason == "CANCELLED" and turn.end.usage.completion_tokens < 1000
        end = chat.send("short now", max_new_tokens=3).until_end()
        assert end.finish_reason == "LENGTH" and end.usage.completion_tokens == 3


def test_count_tokens_and_list_models(client):
    models = client.list_models()
    assert len(models) == 1 and models[0].max_context > 0
    count = client.count_tokens("hello world")
    assert count.count > 0 and count.max_context == models[0].max_context
    chat_count = client.count_tokens(messages=[("system", "be nice"), ("user", "hello world")])
    assert chat_count.count > count.count


def test_bad_key_is_unauthenticated_and_not_retried(router):
    with Client(router, api_key="lg_nope", timeout=10) as c, pytest.raises(Unauthenticated) as err:
        c.generate("x", **GREEDY)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_rate_limited_call_is_retried_after_the_advertised_delay(router, keys):
    seen = []

    class Recording(RetryPolicy):
        def delay_s(self, attempt, error, remaining_s):
            wait = super().delay_s(attempt, error, remaining_s)
            seen.append((error, wait))
            return wait

    with Client(router, api_key=keys["slow"], timeout=30, retry=NO_RETRY) as plain:
        plain.generate("x", **GREEDY)  # spends the burst of 1
        with pytest.raises(RateLimited) as err:
            plain.generate("x", **GREEDY)
        assert 0 < err.value.retry_after_s <= 1.5
    with Client(router, api_key=keys["slow"], timeout=30, retry=Recording()) as retrying:
        t0 = time.monotonic()
        out = retrying.generate("x", **GREEDY)
        waited = time.monotonic() - t0
    assert out.usage.completion_tokens > 0
    assert seen and all(isinstance(e, RateLimited) and w >= e.retry_after_s > 0 for e, w in seen)
    assert waited >= seen[0][0].retry_after_s


# ------------------------------------------------------------------------------------------------ async, via router


def test_async_client(router, keys):
    async def main():
        async with AsyncClient(router, api_key=keys["k"], timeout=60) as c:
            one = await c.generate("hello", **GREEDY, ignore_eos=True)
            assert len(one.token_ids) == 4
            chunks = [ch async for ch in c.generate_stream("hello", **GREEDY, ignore_eos=True)]
            assert "".join(ch.text for ch in chunks) == one.text
            assert (await c.count_tokens("hello world")).count > 0
            assert len(await c.list_models()) == 1
            chat = c.chat(system="You are terse.", **GREEDY)
            ends = []
            for text in ("hi", "more", "thanks"):
                events = [e async for e in chat.send(text)]
                assert isinstance(events[-1], TurnEnd)
                ends.append(events[-1])
            assert ends[2].usage.prompt_tokens > ends[1].usage.prompt_tokens > ends[0].usage.prompt_tokens
            # cancel
            async for e in chat.send("talk", max_new_tokens=1000, ignore_eos=True):
                if isinstance(e, ChatDelta):
                    await chat.cancel()
                else:
                    assert e.finish_reason == "CANCELLED"
            await chat.close()

    asyncio.run(main())


# ------------------------------------------------------------------------------------------------ retries, fake server


class Flaky(pb_grpc.InferenceServicer):
    """Fails the first `fail` calls of each method with UNAVAILABLE (before any message); `fail_mid_stream` makes
    GenerateStream fail after its first chunk instead."""

    def __init__(self, fail: int = 2, fail_mid_stream: bool = False) -> None:
        self.fail = fail
        self.fail_mid_stream = fail_mid_stream
        self.calls: dict[str, int] = {}
        self.metadata: list[dict] = []

    def _maybe_fail(self, name, context):
        self.calls[name] = self.calls.get(name, 0) + 1
        self.metadata.append(dict(context.invocation_metadata()))
        if self.calls[name] <= self.fail:
            context.set_trailing_metadata((("retry-after-ms", "50"),))
            context.abort(grpc.StatusCode.UNAVAILABLE, "no healthy worker")

    def Generate(self, request, context):
        self._maybe_fail("Generate", context)
        return pb.GenerateResponse(outputs=[pb.Completion(text="ok", finish_reason=pb.LENGTH, token_ids=[5])])

    def GenerateStream(self, request, context):
        if not self.fail_mid_stream:
            self._maybe_fail("GenerateStream", context)
        else:
            self.calls["GenerateStream"] = self.calls.get("GenerateStream", 0) + 1
        yield pb.GenerateChunk(index=0, text="a", token_ids=[5])
        if self.fail_mid_stream:
            context.abort(grpc.StatusCode.UNAVAILABLE, "worker lost")
        yield pb.GenerateChunk(index=0, text="b", token_ids=[6], finish_reason=pb.LENGTH,
                               usage=pb.Usage(completion_tokens=2))

    def Chat(self, request_iterator, context):
        self._maybe_fail("Chat", context)
        for req in request_iterator:
            if req.HasField("turn"):
                n = len(req.turn.messages)
                yield pb.ChatEvent(delta=pb.ChatDelta(text=f"got {n}"))
                if self.fail_mid_stream:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "worker lost")
                yield pb.ChatEvent(end=pb.TurnEnd(finish_reason=pb.LENGTH, usage=pb.Usage(prompt_tokens=n)))


@pytest.fixture()
def fake():
    servicer = Flaky()
    server = grpc.server(futures.ThreadPoolExecutor(8))
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_unavailable_is_retried_before_anything_streamed(fake):
    servicer, address = fake
    retry = RetryPolicy(max_attempts=5, initial_backoff_s=0.01)
    with Client(address, api_key="secret", timeout=10, retry=retry) as c:
        t0 = time.monotonic()
        assert c.generate("x").text == "ok"
        assert time.monotonic() - t0 >= 2 * 0.05  # honoured retry-after-ms twice
        assert servicer.calls["Generate"] == 3
        assert all(m["authorization"] == "Bearer secret" for m in servicer.metadata)
        assert "".join(ch.text for ch in c.generate_stream("x")) == "ab"
        assert servicer.calls["GenerateStream"] == 3
    with Client(address, timeout=10, retry=NO_RETRY) as c, pytest.raises(Unavailable) as err:
        servicer.calls.clear()
        c.generate("x")
    assert err.value.retry_after_s == pytest.approx(0.05) and not err.value.streamed


def test_chat_reopens_with_history_when_unavailable_before_any_event(fake):
    servicer, address = fake
    with Client(address, timeout=10, retry=RetryPolicy(initial_backoff_s=0.01)) as c, c.chat(system="sys") as chat:
        turn = chat.send("hi")
        assert list(turn)[-1].usage.prompt_tokens == 2 and turn.text == "got 2"
        assert servicer.calls["Chat"] == 3
        second = chat.send("again")
        assert second.until_end().usage.prompt_tokens == 1  # same stream: only the new message
        servicer.fail_mid_stream = True
        with pytest.raises(Unavailable) as err:
            chat.send("lost").until_end()  # failed after its first event: raised, not retried
        assert err.value.streamed and servicer.calls["Chat"] == 3
        servicer.fail_mid_stream = False
        # a new stream, opened with the conversation so far: sys, hi, reply, again, reply + the new message
        assert chat.send("back").until_end().usage.prompt_tokens == 6
        assert servicer.calls["Chat"] == 4


def test_stream_that_already_yielded_is_not_retried(fake):
    servicer, address = fake
    servicer.fail_mid_stream = True
    with Client(address, timeout=10, retry=RetryPolicy(initial_backoff_s=0.01)) as c:
        got = []
        with pytest.raises(Unavailable) as err:
            for chunk in c.generate_stream("x"):
                got.append(chunk.text)
        assert got == ["a"] and err.value.streamed
        assert servicer.calls["GenerateStream"] == 1


def test_async_retries_and_stream_failure(fake):
    servicer, address = fake

    async def main():
        async with AsyncClient(address, timeout=10, retry=RetryPolicy(initial_backoff_s=0.01)) as c:
            assert (await c.generate("x")).text == "ok"
            assert servicer.calls["Generate"] == 3
            chat = c.chat(system="sys")
            events = [e async for e in chat.send("hi")]
            assert events[-1].usage.prompt_tokens == 2 and servicer.calls["Chat"] == 3
            await chat.close()
            servicer.fail_mid_stream = True
            got = []
            with pytest.raises(Unavailable) as err:
                async for chunk in c.generate_stream("x"):
                    got.append(chunk.text)
            assert got == ["a"] and err.value.streamed

    asyncio.run(main())


def test_deadline_bounds_retries(fake):
    servicer, address = fake
    servicer.fail = 100
    with Client(address, timeout=0.5, retry=RetryPolicy(max_attempts=100, initial_backoff_s=0.05)) as c:
        t0 = time.monotonic()
        with pytest.raises(Unavailable):
            c.generate("x")
        assert time.monotonic() - t0 < 5


def test_retry_policy_and_error_parsing():
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.1, jitter=0.0)

    class E(grpc.RpcError):
        def __init__(self, code, trailers=()):
            self._code, self._trailers = code, trailers

        def code(self):
            return self._code

        def details(self):
            return "d"

        def trailing_metadata(self):
            return self._trailers

    unavailable = error_from_rpc(E(grpc.StatusCode.UNAVAILABLE))
    assert isinstance(unavailable, Unavailable) and unavailable.retry_after_s is None
    assert policy.delay_s(1, unavailable, None) == pytest.approx(0.1)
    assert policy.delay_s(2, unavailable, None) == pytest.approx(0.2)
    assert policy.delay_s(3, unavailable, None) is None  # attempts spent
    assert policy.delay_s(1, unavailable, 0.05) is None  # past the deadline
    limited = error_from_rpc(E(grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after-ms", "700"),)))
    assert isinstance(limited, RateLimited) and policy.delay_s(1, limited, None) == pytest.approx(0.7)
    never = error_from_rpc(E(grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert policy.delay_s(1, never, None) is None  # no retry delay: the request can never fit
    assert policy.delay_s(1, error_from_rpc(E(grpc.StatusCode.INVALID_ARGUMENT)), None) is None
    assert policy.delay_s(1, error_from_rpc(E(grpc.StatusCode.UNAVAILABLE), streamed=True), None) is None

    from google.protobuf import duration_pb2
    from google.rpc import error_details_pb2, status_pb2
    st = status_pb2.Status(code=8)
    st.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2)))
    assert _retry_after_s((("grpc-status-details-bin", st.SerializeToString()),)) == pytest.approx(2.0)

    params = sampling_parameters(max_new_tokens=3, stop="x", temperature=None, ignore_eos=True)
    assert params.max_new_tokens == 3 and list(params.stop) == ["x"] and not params.HasField("temperature")
    with pytest.raises(TypeError):
        sampling_parameters(max_tokens=3)


# ------------------------------------------------------------------------------------------------ CLI and example


def _cli(*args: str, client_only: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """`llamagrid ARGS`; client_only: with every server-only package unimportable (tests/client_only.py)."""
    entry = ["-m", "tests.client_only", "llamagrid"] if client_only else ["-m", "llamagrid"]
    return subprocess.run([sys.executable, *entry, *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          **kwargs)


def test_cli_generate_json(router, keys):
    proc = _cli("generate", "hello there", "--max-new-tokens", "6", "--temperature", "0", "--ignore-eos", "--json",
                "--address", router, "--api-key", keys["k"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["num_tokens"] == len(out["token_ids"]) == out["usage"]["completion_tokens"] == 6
    assert out["finish_reason"] == "LENGTH" and isinstance(out["text"], str)


def test_cli_generate_streams_text_with_env_defaults(router, keys):
    env = {**os.environ, "LLAMAGRID_ADDRESS": router, "LLAMAGRID_API_KEY": keys["k"]}
    proc = _cli("generate", "hello there", "--max-new-tokens", "6", "--temperature", "0", "--ignore-eos", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Client(router, api_key=keys["k"]) as c:
        expected = c.generate("hello there", max_new_tokens=6, temperature=0.0, ignore_eos=True).text
    assert proc.stdout == expected + "\n"


def test_cli_generate_from_a_client_only_install(router, keys):
    """No torch, transformers, redis, structlog, prometheus_client... importable: the same text as the library's."""
    proc = _cli("generate", "hello there", "--max-new-tokens", "6", "--temperature", "0", "--ignore-eos",
                "--address", router, "--api-key", keys["k"], client_only=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Client(router, api_key=keys["k"]) as c:
        expected = c.generate("hello there", max_new_tokens=6, temperature=0.0, ignore_eos=True).text
    assert proc.stdout == expected + "\n"


def test_cli_chat_two_lines_then_eof(router, keys):
    proc = _cli("chat", "--system", "You are terse.", "--max-new-tokens", "4", "--temperature", "0", "-v",
                "--address", router, "--api-key", keys["k"], input="hi\nhow are you\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    finishes = [line for line in proc.stderr.splitlines() if line.startswith("[finish=")]
    assert len(finishes) == 2, proc.stderr


def test_cli_chat_sigint_cancels_the_reply_not_the_session(router, keys):
    proc = subprocess.Popen([sys.executable, "-m", "llamagrid", "chat", "--max-new-tokens", "1500",
                             "--temperature", "0", "--ignore-eos", "-v", "--address", router, "--api-key", keys["k"]],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        proc.stdin.write(b"talk\n")
        proc.stdin.flush()
        first = proc.stdout.read(1)  # the reply has started streaming
        assert first, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        proc.stdin.close()  # after the cancelled reply, EOF at the prompt: exit
        stdout = first + proc.stdout.read()
        assert proc.wait(60) == 0
        assert b"[cancelled]" in stdout
        assert b"[finish=CANCELLED" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_rag_chat_example(router, keys):
    env = {**os.environ, "LLAMAGRID_ADDRESS": router, "LLAMAGRID_API_KEY": keys["k"]}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "rag_chat.py"), "--max-new-tokens", "8"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("Q: ") and "[finish=" in proc.stdout
