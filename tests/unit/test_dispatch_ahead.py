"""router.ahead.Headroom and Authenticator.known: what allows a job to be sent before its admission is decided."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from ratelimit.limiter import Decision, QuotaDecision
from router.ahead import Headroom
from router.auth import Authenticator, Presented
from router.errors import Unauthenticated
from router.keys import ApiKeyStore, KeyRecord


def _decision(requests: int, tokens: int, allowed: bool = True) -> QuotaDecision:
    return QuotaDecision(Decision(allowed, requests, 0.0, 1.0, 10), Decision(True, tokens, 0.0, 1.0, 1000))


def test_headroom_is_what_the_last_decision_left_less_what_went_ahead():
    room = Headroom()
    assert not room.take("k", 1)  # never decided here: never ahead
    room.saw("k", _decision(requests=2, tokens=100))
    assert not room.take("k", 101)  # not enough tokens left
    assert room.take("k", 60)
    assert not room.take("k", 60)  # 40 tokens left after the first dispatch ahead
    assert room.take("k", 40)
    assert not room.take("k", 1)  # both requests spent
    room.saw("k", _decision(requests=5, tokens=500))  # a fresh decision refreshes it
    assert room.take("k", 1)
    room.saw("k", _decision(requests=5, tokens=500, allowed=False))  # a denial leaves no room
    assert not room.take("k", 1)


def test_headroom_is_bounded():
    room = Headroom(max_keys=3)
    for k in "abcd":
        room.saw(k, _decision(1, 1))
    assert not room.take("a", 1)  # the oldest went first
    assert all(room.take(k, 1) for k in "bcd")


def _key(secret_char: str, key_id: str = "A" * 10) -> str:
    from router.keys import _SECRET_LEN, KEY_PREFIX, parse_key_id

    token = f"{KEY_PREFIX}{key_id}_{secret_char * _SECRET_LEN}"
    assert parse_key_id(token) == key_id, "test key has the wrong shape"
    return token


def test_known_is_only_the_exact_key_verified_here():
    auth = Authenticator(ApiKeyStore(aioredis.Redis(), pepper=b"pepper"), max_failures=10)
    token, forged = _key("s"), _key("f")
    record = KeyRecord("A" * 10, "tenant", "pro", (), 0, False)
    presented = Presented("peer", token)
    assert auth.known(presented) is None  # not verified yet
    assert auth.finish(presented, record) is record
    assert auth.known(presented) is record
    assert auth.known(Presented("other-peer", token)) is record  # any peer: the key is what was verified
    assert auth.known(Presented("peer", forged)) is None  # same key id, another secret
    assert auth.known(Presented("peer", None)) is None
    assert auth.speculation(Presented("peer", forged)) is not None  # the one-round-trip guess is by key id only
    with pytest.raises(Unauthenticated):  # the key failing verification later (revoked) forgets it
        auth.finish(presented, None)
    assert auth.known(presented) is None
