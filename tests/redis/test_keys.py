"""API key store and `keys` CLI against a real redis-server."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import redis.asyncio

from router.keys import KEY_LEN, ApiKeyStore, KeyRecord, parse_bearer, parse_key_id
from router.keys_cli import add_keys_parser

ROOT = Path(__file__).resolve().parents[2]


def _with_store(run, body, **kwargs):
    return run(lambda _limiter, client: body(ApiKeyStore(client, **kwargs), client))


def test_create_then_authenticate(run):
    async def body(store, client):
        record, key = await store.create("acme", "gold", ["llama-2-7b", "llama-2-13b"])
        got = await store.authenticate(key)
        return record, key, got

    record, key, got = _with_store(run, body)
    assert got == record
    assert (got.tenant, got.tier, got.models, got.revoked) == ("acme", "gold", ("llama-2-7b", "llama-2-13b"), False)
    assert key.startswith("lg_") and len(key) == KEY_LEN >= 40
    assert parse_key_id(key) == record.key_id


def test_wrong_secret_and_unknown_id_are_rejected(run):
    async def body(store, client):
        record, key = await store.create("acme", "free")
        head, secret = key[:14], key[14:]  # "lg_" + 10-char id + "_"
        assert head == f"lg_{record.key_id}_"
        flipped_first = head + ("A" if secret[0] != "A" else "B") + secret[1:]
        flipped_last = head + secret[:-1] + ("x" if secret[-1] != "x" else "y")
        other_id = "lg_" + "Z" * 10 + "_" + secret
        return [await store.authenticate(k) for k in (flipped_first, flipped_last, other_id)]

    assert _with_store(run, body) == [None, None, None]


@pytest.mark.parametrize("bad", [
    "", "lg_", "abc", "Bearer x", "lg_short_secret",
    "xx_" + "a" * 10 + "_" + "b" * 43, "lg_" + "a" * 10 + "-" + "b" * 43,
    "lg_" + "é" * 10 + "_" + "b" * 43, "lg_" + "a" * 10 + "_" + "ß" * 43, "lg_" + "a" * 10 + "_" + "b" * 42 + "\n",
    "\x00" * 57, "lg_" + "a" * 10 + "_" + "b" * 10**6, None, 12345, b"lg_" + b"a" * 54,
])
def test_malformed_keys_return_none(run, bad):
    async def body(store, client):
        await store.create("acme", "free")
        return await store.authenticate(bad)

    assert _with_store(run, body) is None


def test_revoke_then_list(run):
    async def body(store, client):
        r1, k1 = await store.create("acme", "gold")
        r2, k2 = await store.create("beta", "free", ["m1"])
        revoked = await store.revoke(r1.key_id)
        again = await store.revoke(r1.key_id)
        unknown = await store.revoke("NoSuchId00")
        return r1, r2, k1, k2, revoked, again, unknown, await store.authenticate(k1), await store.authenticate(k2), \
            await store.list()

    r1, r2, k1, k2, revoked, again, unknown, a1, a2, listed = _with_store(run, body)
    assert (revoked, again, unknown) == (True, True, False)
    assert a1 is None and a2 == r2
    by_id = {r.key_id: r for r in listed}
    assert set(by_id) == {r1.key_id, r2.key_id}
    assert by_id[r1.key_id].revoked and not by_id[r2.key_id].revoked
    assert by_id[r2.key_id].models == ("m1",)
    text = repr(listed)
    assert k1 not in text and k2 not in text and "digest" not in text


def test_stored_digest_is_not_the_key(run, redis_server):
    async def body(store, client):
        return await store.create("acme", "gold")

    record, key = _with_store(run, body)
    with redis.Redis.from_url(redis_server.url, decode_responses=True) as sync:
        assert sorted(sync.keys("*")) == ["lg:key:" + record.key_id, "lg:keys"]
        stored = sync.hgetall(f"lg:key:{record.key_id}")
        assert sync.smembers("lg:keys") == {record.key_id}
    assert set(stored) == {"digest", "tenant", "tier", "models", "created_at", "revoked"}
    assert len(stored["digest"]) == 64 and stored["digest"] != key
    secret = key[14:]
    assert not any(secret in v or key in v for v in stored.values())


def test_pepper_changes_digest(run):
    async def body(store, client):
        record, key = await store.create("acme", "gold")
        return key, await store.authenticate(key), await ApiKeyStore(client).authenticate(key)

    key, peppered, plain = _with_store(run, body, pepper=b"server-secret")
    assert peppered is not None and plain is None


def test_decoding_client(run, redis_server):
    """A client with decode_responses=True reads the same records."""

    async def body():
        client = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            store = ApiKeyStore(client)
            record, key = await store.create("acme", "gold", ["m1"])
            return record, await store.authenticate(key), await store.list()
        finally:
            await client.aclose()

    run(lambda _limiter, _client: _noop())  # flush Redis
    record, got, listed = asyncio.run(body())
    assert got == record and listed == [record]


def test_keys_are_unique_and_long(run):
    async def body(store, client):
        return [(await store.create("acme", "free"))[1] for _ in range(50)]

    keys = _with_store(run, body)
    assert len(set(keys)) == 50 and len({parse_key_id(k) for k in keys}) == 50
    assert all(len(k) >= 40 for k in keys)


@pytest.mark.parametrize("field,tenant,tier", [
    ("tenant", "", "free"), ("tenant", "a b", "free"), ("tenant", "x" * 65, "free"), ("tier", "acme", ""),
    ("tier", "acme", "gold\n"),
])
def test_invalid_names(run, field, tenant, tier):
    async def body(store, client):
        with pytest.raises(ValueError, match=field):
            await store.create(tenant, tier)
        return await store.list()

    assert _with_store(run, body) == []


def test_invalid_models(run):
    async def body(store, client):
        for models in (["a b"], [""], "llama"):
            with pytest.raises(ValueError, match="models"):
                await store.create("acme", "gold", models)

    _with_store(run, body)


def test_allows_model():
    everything = KeyRecord("a" * 10, "t", "free", (), 0, False)
    some = KeyRecord("a" * 10, "t", "free", ("llama-2-7b",), 0, False)
    assert everything.allows_model("anything")
    assert some.allows_model("llama-2-7b") and not some.allows_model("llama-2-13b")


@pytest.mark.parametrize("value,expected", [
    ("Bearer lg_abc", "lg_abc"), ("bearer lg_abc", "lg_abc"), ("BEARER lg_abc", "lg_abc"),
    ("", None), ("Bearer", None), ("Bearer ", None), ("Bearer  lg_abc", None), ("Bearer lg_abc ", None),
    (" Bearer lg_abc", None), ("Basic lg_abc", None), ("Bearer lg abc", None), ("Bearer\tlg_abc", None),
    ("lg_abc", None), ("Bearer lg_é", None), ("Bearer lg_abc\n", None), ("Bearer " + "a" * 5000, None), (None, None),
])
def test_parse_bearer(value, expected):
    assert parse_bearer(value) == expected


def _cli(capsys, *argv):
    parser = argparse.ArgumentParser(prog="llamagrid")
    add_keys_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["keys", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_end_to_end(run, redis_server, capsys):
    run(lambda _limiter, _client: _noop())  # flush Redis
    url = ["--redis-url", redis_server.url]
    code, out, err = _cli(capsys, "create", "--tenant", "acme", "--tier", "gold", "--model", "m1", "--model", "m2",
                          *url)
    key = out.strip()
    key_id = parse_key_id(key)
    assert code == 0 and out.count("\n") == 1 and key_id is not None and key not in err
    assert key_id in err and "acme" in err and "gold" in err

    record = asyncio.run(_authenticate(redis_server.url, key))
    assert (record.tenant, record.tier, record.models) == ("acme", "gold", ("m1", "m2"))

    code, out, err = _cli(capsys, "list", *url)
    assert code == 0 and key not in out and key not in err and key.split("_", 2)[2] not in out
    header, row = out.splitlines()
    assert header.split() == ["ID", "TENANT", "TIER", "MODELS", "CREATED", "REVOKED"]
    assert row.split() == [key_id, "acme", "gold", "m1,m2", row.split()[4], "no"] and "T" in row.split()[4]

    assert _cli(capsys, "revoke", key_id, *url)[0] == 0
    assert asyncio.run(_authenticate(redis_server.url, key)) is None
    assert _cli(capsys, "list", *url)[1].splitlines()[1].split()[-1] == "yes"
    assert _cli(capsys, "revoke", "NoSuchId00", *url)[0] == 1
    assert _cli(capsys, "create", "--tenant", "a b", "--tier", "gold", *url)[0] == 2


async def _noop():
    return None


async def _authenticate(url, key):
    client = redis.asyncio.Redis.from_url(url)
    try:
        return await ApiKeyStore(client).authenticate(key)
    finally:
        await client.aclose()


def test_cli_subprocess_prints_only_the_key(run, redis_server):
    run(lambda _limiter, _client: _noop())  # flush Redis
    code = ("import argparse, sys; from router.keys_cli import add_keys_parser; p = argparse.ArgumentParser(); "
            "add_keys_parser(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")
    env = {**os.environ, "LLAMAGRID_REDIS_URL": redis_server.url}
    done = subprocess.run([sys.executable, "-c", code, "keys", "create", "--tenant", "acme", "--tier", "free"],
                          capture_output=True, text=True, env=env, timeout=30, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert done.stdout == key + "\n" and parse_key_id(key) in done.stderr and key not in done.stderr
    assert asyncio.run(_authenticate(redis_server.url, key)).tenant == "acme"
