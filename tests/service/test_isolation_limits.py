"""Tenants cannot hurt each other, against real processes: router subprocesses (`python -m router`, their stderr
parsed), fake workers, a real redis-server and real gRPC clients. Here: every call is metered (CountTokens and
ListModels too) and bounded in size, a key's calls and Chat sessions in flight are capped, and one peer's failed
logins do not lock out valid keys. (Chat sessions, field names and clean logs: test_isolation_sessions.py.)"""

from __future__ import annotations

import grpc
import pytest

from protos.llamagrid.v1 import inference_pb2 as pb
from router.keys import parse_key_id
from tests.support.calls import (
    SHORT,
    Chat,
    eventually_ok,
    quota_subjects,
    raises,
    retry_delay_ms,
    turn,
)
from tests.support.isolation import MAX_CHARS, routers
from tests.support.load import code_of
from tests.support.router import auth, create_keys
from tests.support.waits import wait_until

LONG = pb.SamplingParameters(max_new_tokens=3000, temperature=0.0, ignore_eos=True)  # seconds on a fake worker


@pytest.fixture(scope="module")
def keys(redis_server) -> dict[str, str]:
    return create_keys(redis_server.url, {
        "gen": ("gen", []), "attacked": ("gen", []), "fresh": ("gen", []),
        "count": ("tiny", []), "list": ("tiny", []), "size": ("tiny", []), "small": ("small", []),
        "cap": ("capped", []), "cap_other": ("capped", []), "cap_chat": ("capped", []),
    })


@pytest.fixture(scope="module")
def router(redis_server, keys, module_fakes, tmp_path_factory):
    worker = module_fakes.start()
    tmp = tmp_path_factory.mktemp("isolation-limits")
    with routers({"main": (tmp, "main", redis_server.url, worker.address, keys["gen"])}) as started:
        yield started["main"]


@pytest.fixture(scope="module")
def stub(router):
    return router.stub


# ---- metering and size


def test_count_tokens_and_list_models_are_metered(stub, keys):
    count = pb.CountTokensRequest(text="hello world")
    for _ in range(3):  # the tier's request burst
        assert stub.CountTokens(count, metadata=auth(keys["count"]), timeout=10).count > 0
    err = raises(lambda: stub.CountTokens(count, metadata=auth(keys["count"]), timeout=10),
                  grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert retry_delay_ms(err) > 0
    assert any(s.endswith(":requests") for s in quota_subjects(err))

    for _ in range(3):
        assert stub.ListModels(pb.ListModelsRequest(), metadata=auth(keys["list"]), timeout=10).models
    err = raises(lambda: stub.ListModels(pb.ListModelsRequest(), metadata=auth(keys["list"]), timeout=10),
                  grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert retry_delay_ms(err) > 0


def test_oversize_calls_are_invalid_argument_naming_the_field_and_not_charged(stub, keys):
    md = auth(keys["size"])  # tier "tiny": 3 requests, no refill to speak of
    big = "a" * (MAX_CHARS + 1)
    calls = {
        "text": lambda: stub.CountTokens(pb.CountTokensRequest(text=big), metadata=md, timeout=10),
        "chat.messages": lambda: stub.CountTokens(pb.CountTokensRequest(chat=pb.ChatTurn(messages=[
            pb.ChatMessage(role="system", content=big[:MAX_CHARS // 2]),
            pb.ChatMessage(role="user", content=big[:MAX_CHARS // 2 + 1])])), metadata=md, timeout=10),
        "inputs": lambda: stub.Generate(pb.GenerateRequest(inputs=["x", big[:MAX_CHARS]], parameters=SHORT),
                                        metadata=md, timeout=10),
        "turns[0].messages": lambda: stub.Chat(iter([turn(big)]), metadata=md, timeout=10),
    }
    for field, call in calls.items():
        for _ in range(2):
            err = raises(call, grpc.StatusCode.INVALID_ARGUMENT)
            assert err.details().startswith(f"{field}: "), err.details()
            assert str(MAX_CHARS) in err.details()
    # none of the 8 refusals was charged: the whole burst of 3 is left. (Texts kept under the model's context in
    # tokens: the shared worker's transformers tokenizer warns about longer ones in a line that is not JSON.)
    for _ in range(3):
        assert stub.CountTokens(pb.CountTokensRequest(text="x" * 2000), metadata=md, timeout=10).count > 0
    raises(lambda: stub.CountTokens(pb.CountTokensRequest(text="x"), metadata=md, timeout=10),
            grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_a_cost_that_never_fits_the_token_burst_is_invalid_argument_and_not_charged(stub, keys):
    md = auth(keys["small"])  # tier "small": token burst 50, 3 requests
    big_new = pb.SamplingParameters(max_new_tokens=100, temperature=0.0)
    calls = {
        "inputs": lambda: stub.Generate(pb.GenerateRequest(inputs=["x"], parameters=big_new), metadata=md,
                                        timeout=10),
        "text": lambda: stub.CountTokens(pb.CountTokensRequest(text="y" * 300), metadata=md, timeout=10),
        "turns[0]": lambda: stub.Chat(iter([turn(params=big_new)]), metadata=md, timeout=10),
    }
    for field, call in calls.items():
        err = raises(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert err.details().startswith(f"{field}: "), err.details()
        assert "at most 50" in err.details()
    for _ in range(3):  # the refusals took no request from the burst
        out = stub.Generate(pb.GenerateRequest(inputs=["x"], parameters=SHORT), metadata=md, timeout=30)
        assert out.outputs[0].usage.completion_tokens > 0
    err = raises(lambda: stub.Generate(pb.GenerateRequest(inputs=["x"], parameters=SHORT), metadata=md, timeout=10),
                  grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert retry_delay_ms(err) > 0


# ---- per-key caps


def _stream(stub, key: str, params: pb.SamplingParameters = LONG):
    """A GenerateStream call whose first chunk arrived (so it holds its slot), or the RpcError it raised."""
    call = stub.GenerateStream(pb.GenerateRequest(inputs=["go on"], parameters=params), metadata=auth(key),
                               timeout=60)
    next(call)
    return call


def test_concurrent_requests_cap_per_key(stub, keys):
    calls = []
    try:
        calls += [_stream(stub, keys["cap"]) for _ in range(2)]
        err = raises(lambda: _stream(stub, keys["cap"]), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert retry_delay_ms(err) == 1000
        assert any("concurrent_requests" in s for s in quota_subjects(err))
        raises(lambda: stub.Generate(pb.GenerateRequest(inputs=["x"], parameters=SHORT), metadata=auth(keys["cap"]),
                                      timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED)
        # another key of the same tier is not affected
        out = stub.Generate(pb.GenerateRequest(inputs=["x"], parameters=SHORT), metadata=auth(keys["cap_other"]),
                            timeout=30)
        assert out.outputs[0].usage.completion_tokens > 0
        # a client cancel frees its slot
        calls.pop(0).cancel()
        calls.append(eventually_ok(lambda: _stream(stub, keys["cap"]), "a slot freed by a cancel"))
    finally:
        for call in calls:
            call.cancel()
    # calls that end by themselves free their slots too
    for _ in range(3):
        end = eventually_ok(lambda: list(stub.GenerateStream(pb.GenerateRequest(inputs=["x"], parameters=SHORT),
                                                              metadata=auth(keys["cap"]), timeout=30)),
                             "the cancelled calls' slots freed")
        assert end[-1].finish_reason in (pb.LENGTH, pb.EOS)
    # ... and every slot is back: two at once again
    calls = []
    try:
        for _ in range(2):
            calls.append(eventually_ok(lambda: _stream(stub, keys["cap"]), "every slot freed"))
    finally:
        for call in calls:
            call.cancel()


def test_chat_sessions_cap_per_key(stub, keys):
    sessions = []
    try:
        for _ in range(2):
            sessions.append(Chat(stub, keys["cap_chat"]))
            sessions[-1].turn()
        third = Chat(stub, keys["cap_chat"])
        try:
            with pytest.raises(grpc.RpcError) as err:
                third.turn()
        finally:
            third.cancel()  # (ends its request iterator)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert retry_delay_ms(err.value) == 1000
        assert any("concurrent_sessions" in s for s in quota_subjects(err.value))
        # the open sessions keep working, and another key opens sessions freely
        assert sessions[0].turn().usage.completion_tokens > 0
        other = Chat(stub, keys["cap_other"])
        other.turn()
        other.close()
        # closing a session (half-close) frees its slot
        sessions.pop(0).close()
        sessions.append(eventually_ok(lambda: _opened(stub, keys["cap_chat"]), "a session slot freed by a close"))
        # so does a client cancel
        sessions.pop(0).cancel()
        sessions.append(eventually_ok(lambda: _opened(stub, keys["cap_chat"]), "a session slot freed by a cancel"))
    finally:
        for chat in sessions:
            chat.cancel()


def _opened(stub, key: str) -> Chat:
    """A Chat session whose first turn ended (or the RpcError that refused it)."""
    chat = Chat(stub, key)
    try:
        chat.turn()
    except BaseException:
        chat.cancel()
        raise
    return chat


# ---- auth failures


def test_auth_failures_do_not_lock_out_valid_keys(router, stub, keys):
    count = pb.CountTokensRequest(text="hi")
    attacked, fresh = keys["attacked"], keys["fresh"]
    assert stub.CountTokens(count, metadata=auth(attacked), timeout=10).count > 0  # verified here before
    start = router.log_size()
    unknown = [f"lg_Unknown{i:03d}_{'s' * 43}" for i in range(5)]  # well-formed, never created
    assert all(parse_key_id(k) is not None for k in unknown)
    keyless = [(), (("authorization", "Bearer not-a-key"),), (("authorization", "Basic abc"),)]
    # 15 attempts: 10 without a well-formed key (they count for this peer), 5 with unknown key ids, interleaved
    attempts = [keyless[i % 3] for i in range(10)]
    for i, key in enumerate(unknown):
        attempts.insert(3 * i, auth(key))
    codes = [code_of(lambda md=md: stub.CountTokens(count, metadata=md, timeout=10)) for md in attempts]
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 15
    # the attacker's slot (this peer, without a well-formed key) is limited now
    err = raises(lambda: stub.CountTokens(count, timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert quota_subjects(err) == ["peer"] and retry_delay_ms(err) > 0

    wrong_secret = attacked[:-5] + ("AAAAA" if not attacked.endswith("AAAAA") else "BBBBB")
    assert parse_key_id(wrong_secret) == parse_key_id(attacked)
    codes = [code_of(lambda: stub.CountTokens(count, metadata=auth(wrong_secret), timeout=10)) for _ in range(15)]
    assert codes[:10] == [grpc.StatusCode.UNAUTHENTICATED] * 10
    assert codes[10:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 5
    err = raises(lambda: stub.CountTokens(count, metadata=auth(wrong_secret), timeout=10),
                  grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert quota_subjects(err) == [f"peer+key:{parse_key_id(attacked)}"]

    # from the same peer, the attacked key still works, and so does a key this router never saw
    for key in (attacked, fresh):
        assert stub.CountTokens(count, metadata=auth(key), timeout=10).count > 0
        out = stub.Generate(pb.GenerateRequest(inputs=["x"], parameters=SHORT), metadata=auth(key), timeout=30)
        assert out.outputs[0].usage.completion_tokens > 0

    # 32 failed or refused attempts, a few log lines: one per event (and reason) and 10 s, with `suppressed`
    wait_until(lambda: router.events("auth_blocked", start), "an auth_blocked line")
    lines = [e for e in router.events(start=start) if e.get("event") in ("auth_failed", "auth_blocked")]
    assert 1 <= len(lines) <= 4, lines
    assert all("suppressed" in e for e in lines), lines
