"""Tenants cannot hurt each other, against real processes (router subprocesses, fake workers, a real redis-server).
Here: a Chat session re-verifies its key at every turn and ends when idle or old; errors name the public request's
fields; cancelling Chat turns in every way leaves nothing but JSON in the router's log. (Metering, caps and auth
lockout: test_isolation_limits.py.)"""

from __future__ import annotations

import time

import grpc
import pytest

from protos.llamagrid.v1 import inference_pb2 as pb
from ratelimit.redis_server import RedisServer
from router.keys import parse_key_id
from tests.support.calls import SHORT, Chat, raises, turn
from tests.support.fake_model import Script
from tests.support.isolation import routers
from tests.support.router import admin, auth, create_keys, log_problems
from tests.support.waits import wait_until

# --chat-idle-timeout / --chat-max-age of the second router: 3 s apart, so a short first turn on a loaded machine
# still ends long before the age limit and the idle limit is what ends the session.
IDLE_S, MAX_AGE_S = 1.0, 4.0
LONG = pb.SamplingParameters(max_new_tokens=3000, temperature=0.0, ignore_eos=True)  # seconds on a fake worker


@pytest.fixture(scope="module")
def keys(redis_server) -> dict[str, str]:
    return create_keys(redis_server.url, {"gen": ("gen", []), "revoke": ("gen", []), "mover": ("gen", []),
                                          "names": ("gen", []), "chat": ("gen", [])})


@pytest.fixture(scope="module")
def routers_(redis_server, keys, module_fakes, tmp_path_factory):
    """"main": the router of most tests; "timeouts": one with short Chat idle and age limits, on a Redis of its own
    (routers sharing a Redis split per-key caps among them), in front of a worker that takes at least 4.5 s for
    3000 tokens (it sleeps 1.5 ms per token), longer than MAX_AGE_S."""
    main_worker = module_fakes.start()
    slow_worker = module_fakes.start(Script(token_delay_s=0.0015))
    tmp = tmp_path_factory.mktemp("isolation-sessions")
    with RedisServer() as other_redis:
        timeout_key = create_keys(other_redis.url, {"t": ("gen", [])})["t"]
        with routers({"main": (tmp, "main", redis_server.url, main_worker.address, keys["gen"]),
                      "timeouts": (tmp, "timeouts", other_redis.url, slow_worker.address, timeout_key,
                                   "--chat-idle-timeout", str(IDLE_S), "--chat-max-age", str(MAX_AGE_S))}) as started:
            yield started


@pytest.fixture(scope="module")
def router(routers_):
    return routers_["main"]


@pytest.fixture(scope="module")
def stub(router):
    return router.stub


# ---- Chat sessions


def _set_key_field(redis_url: str, key: str, **fields) -> None:
    async def change(client, store):
        key_id = parse_key_id(key)
        if fields.pop("revoked", False):
            assert await store.revoke(key_id)
        if fields:
            await client.hset(f"lg:key:{key_id}", mapping=fields)

    admin(redis_url, change)


def test_chat_turn_after_revocation_is_unauthenticated(stub, keys, redis_server):
    chat = Chat(stub, keys["revoke"])
    try:
        assert chat.turn().finish_reason in (pb.LENGTH, pb.EOS)
        _set_key_field(redis_server.url, keys["revoke"], revoked=True)
        started = time.monotonic()
        chat.send(turn("again"))
        with pytest.raises(grpc.RpcError) as err:  # not one event of the turn is relayed
            chat.next()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
        assert time.monotonic() - started < 5
    finally:
        chat.cancel()
    # ... and so is a new session
    raises(lambda: stub.Chat(iter([turn()]), metadata=auth(keys["revoke"]), timeout=10),
            grpc.StatusCode.UNAUTHENTICATED)


def test_chat_turn_after_a_tier_change_is_charged_at_the_new_tier(stub, keys, redis_server):
    params = pb.SamplingParameters(max_new_tokens=100, temperature=0.0)
    chat = Chat(stub, keys["mover"])
    try:
        assert chat.turn(turn(params=params)).usage.completion_tokens > 0  # fits tier "gen" easily
        _set_key_field(redis_server.url, keys["mover"], tier="small")  # token burst 50: the same turn never fits
        chat.send(turn("again", params=params))
        with pytest.raises(grpc.RpcError) as err:  # not served at the key's old tier
            chat.next()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert err.value.details().startswith("turns[1]: ") and "at most 50" in err.value.details()
    finally:
        chat.cancel()


def test_idle_chat_session_ends_unavailable(routers_):
    timeouts = routers_["timeouts"]
    chat = Chat(timeouts.stub, timeouts.key, timeout_s=20)
    try:
        chat.turn()
        ended = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            chat.next()
        waited = time.monotonic() - ended
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "idle" in err.value.details()
        assert IDLE_S * 0.8 <= waited < IDLE_S + 5
    finally:
        chat.cancel()


def test_chat_session_past_its_max_age_ends_unavailable_after_the_turn_in_progress(routers_):
    timeouts = routers_["timeouts"]
    started = time.monotonic()
    chat = Chat(timeouts.stub, timeouts.key, timeout_s=30)
    try:
        end = chat.turn(turn("tell me", params=LONG))  # runs well past the session's age limit
        assert end.finish_reason == pb.LENGTH and end.usage.completion_tokens == LONG.max_new_tokens
        assert time.monotonic() - started > MAX_AGE_S
        with pytest.raises(grpc.RpcError) as err:
            chat.next()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "maximum age" in err.value.details()
    finally:
        chat.cancel()


# ---- public field names


def test_worker_errors_name_the_public_fields(stub, keys):
    md = auth(keys["names"])
    bad_top_p = pb.SamplingParameters(max_new_tokens=4, temperature=0.5, top_p=1.5)
    err = raises(lambda: stub.Generate(pb.GenerateRequest(inputs=["x", "y"], parameters=bad_top_p), metadata=md,
                                        timeout=30), grpc.StatusCode.INVALID_ARGUMENT)
    assert err.details().startswith("parameters.top_p: "), err.details()
    err = raises(lambda: stub.GenerateStream(pb.GenerateRequest(inputs=["x"], parameters=bad_top_p), metadata=md,
                                              timeout=30), grpc.StatusCode.INVALID_ARGUMENT)
    assert err.details().startswith("parameters.top_p: "), err.details()

    err = raises(lambda: stub.Generate(pb.GenerateRequest(inputs=["ok", ""], parameters=SHORT), metadata=md,
                                        timeout=30), grpc.StatusCode.INVALID_ARGUMENT)
    assert err.details().startswith("inputs[1]: "), err.details()

    bad_role = [pb.ChatMessage(role="system", content="be brief"), pb.ChatMessage(role="robot", content="hi")]
    err = raises(lambda: stub.Chat(iter([turn(messages=bad_role)]), metadata=md, timeout=30),
                  grpc.StatusCode.INVALID_ARGUMENT)
    assert err.details().startswith("turns[0].messages[1].role: "), err.details()

    # in a later turn of a session, with the turn's own index
    chat = Chat(stub, keys["names"])
    try:
        chat.turn()
        with pytest.raises(grpc.RpcError) as caught:
            chat.turn(turn(params=bad_top_p))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith("turns[1].parameters.top_p: "), caught.value.details()
    finally:
        chat.cancel()
    for details in (err.details(), caught.value.details()):
        assert "job." not in details


# ---- cancelled Chat turns leave a clean log


def test_cancelled_chat_turns_leave_only_json_in_the_log(router, stub, keys):
    start = router.log_size()
    ids = []
    for i in range(3):  # the client cancels the whole stream mid-reply
        ids.append(f"iso-cancel-{i}")
        chat = Chat(stub, keys["chat"], request_id=ids[-1])
        if i:  # (a later turn of a session, too)
            chat.turn()
        chat.send(turn("tell me", params=LONG))
        for _ in range(3):
            assert chat.next().HasField("delta")
        chat.cancel()
    for i in range(2):  # the client cancels the turn (CancelTurn) mid-reply, and then the stream
        ids.append(f"iso-cancel-turn-{i}")
        chat = Chat(stub, keys["chat"], request_id=ids[-1])
        chat.send(turn("tell me", params=LONG))
        assert chat.next().HasField("delta")
        chat.send(pb.ChatRequest(cancel=pb.CancelTurn()))
        while not (event := chat.next()).HasField("end"):
            pass
        assert event.end.finish_reason == pb.CANCELLED
        assert event.end.usage.completion_tokens < LONG.max_new_tokens
        chat.send(turn("and now", params=LONG))
        assert chat.next().HasField("delta")
        if i:
            chat.send(pb.ChatRequest(cancel=pb.CancelTurn()))  # and the stream while that cancel is in flight
        chat.cancel()
    bad_role = [pb.ChatMessage(role="robot", content="hi")]
    for i in range(4):  # a turn the worker refuses (its call to the worker ends in error), after a finished turn
        ids.append(f"iso-refused-{i}")
        chat = Chat(stub, keys["chat"], request_id=ids[-1])
        chat.turn()
        with pytest.raises(grpc.RpcError) as err:
            chat.turn(turn(messages=bad_role))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        chat.cancel()
    for kind in ("early", "overlap", "garbage", "half-close", "deadline"):
        ids.append(f"iso-cancel-{kind}")
        chat = Chat(stub, keys["chat"], request_id=ids[-1], timeout_s=1.0 if kind == "deadline" else 60.0,
                    channel=router.channel if kind == "garbage" else None)
        chat.send(turn("tell me", params=LONG))
        if kind == "early":  # before the turn's first event (while it is being admitted)
            chat.cancel()
            continue
        if kind != "deadline":
            assert chat.next().HasField("delta")
        if kind == "overlap":  # a second turn while the first streams: INVALID_ARGUMENT ends the session
            chat.send(turn("too soon"))
            with pytest.raises(grpc.RpcError) as err:
                while True:
                    chat.next()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        elif kind == "garbage":  # a message that does not parse, mid-reply: INVALID_ARGUMENT ends the session
            chat.send(b"\xff\xff")
            with pytest.raises(grpc.RpcError) as err:
                while True:
                    chat.next()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        elif kind == "half-close":  # no more requests, then gone mid-reply
            chat.send(None)
            assert chat.next().HasField("delta")
        else:  # the client's deadline passes (mid-reply, unless this machine is very slow)
            with pytest.raises(grpc.RpcError) as err:
                while True:
                    chat.next()
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
        chat.cancel()

    # the router serves on, and has logged the end of every cancelled session
    out = stub.Generate(pb.GenerateRequest(inputs=["x"], parameters=SHORT), metadata=auth(keys["chat"]), timeout=30)
    assert out.outputs[0].usage.completion_tokens > 0
    def finished() -> set[str]:
        return {e.get("request_id", "").split("/")[0] for e in router.events("request_finished", start)
                if e.get("method") == "Chat"}

    wait_until(lambda: set(ids) <= finished(), f"every cancelled session to be logged as finished: {ids}", 15)
    problems = log_problems(router.log_text(start))
    assert not problems, problems[:5]
    assert router.proc.poll() is None

