"""API keys: random `lg_<id>_<secret>` strings whose SHA-256/HMAC digests live in Redis, never the keys themselves."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import string
import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis.asyncio as aioredis

KEY_PREFIX = "lg_"
ID_LEN = 10
SECRET_BYTES = 32
_ID_ALPHABET = string.ascii_letters + string.digits
_SECRET_LEN = len(secrets.token_urlsafe(SECRET_BYTES))  # 43 characters for 32 bytes
KEY_LEN = len(KEY_PREFIX) + ID_LEN + 1 + _SECRET_LEN
_KEY_RE = re.compile(rf"{KEY_PREFIX}([A-Za-z0-9]{{{ID_LEN}}})_[A-Za-z0-9_-]{{{_SECRET_LEN}}}", re.ASCII)
_ID_RE = re.compile(rf"[A-Za-z0-9]{{{ID_LEN}}}", re.ASCII)
_BEARER_RE = re.compile(r"(?i:bearer) ([!-~]+)", re.ASCII)
_MAX_NAME = 64
_MAX_MODEL = 256

# Write the hash and index its id only if the id is new (KEYS[1] hash, KEYS[2] id set; ARGV field/value pairs, id last).
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 1, #ARGV - 1))
redis.call('SADD', KEYS[2], ARGV[#ARGV])
return 1
"""
# Mark an existing key revoked; never creates a partial hash for an unknown id.
_REVOKE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'revoked', '1')
return 1
"""


@dataclass(frozen=True)
class KeyRecord:
    """What the router knows about a key: never the key or its digest. Empty `models` means every model."""

    key_id: str
    tenant: str
    tier: str
    models: tuple[str, ...]
    created_at: int
    revoked: bool

    def allows_model(self, model: str) -> bool:
        """True when the key may call `model` (always, for an empty allow-list)."""
        return not self.models or model in self.models


def validate_name(field: str, value: object) -> str:
    """A tenant/tier name: non-empty, at most 64 characters, no whitespace; else ValueError naming `field`."""
    if not isinstance(value, str) or not value or len(value) > _MAX_NAME or any(c.isspace() for c in value):
        raise ValueError(f"{field} must be 1-{_MAX_NAME} characters without whitespace, got {value!r}")
    return value


def _validate_models(models: Iterable[str]) -> tuple[str, ...]:
    if isinstance(models, str):
        raise ValueError("models must be a list of model names, not a string")
    out: list[str] = []
    for m in models:
        if not isinstance(m, str) or not m or len(m) > _MAX_MODEL or any(c.isspace() for c in m):
            raise ValueError(f"models entries must be 1-{_MAX_MODEL} characters without whitespace, got {m!r}")
        if m not in out:
            out.append(m)
    return tuple(out)


def parse_key_id(presented: object) -> str | None:
    """The key id inside a well-formed key, or None for anything else (wrong type, length, prefix or alphabet)."""
    if not isinstance(presented, str) or len(presented) != KEY_LEN:
        return None
    m = _KEY_RE.fullmatch(presented)
    return m.group(1) if m else None


def parse_bearer(metadata_value: object) -> str | None:
    """The token of exactly `Bearer <token>` (scheme case-insensitive, one space, printable ASCII token), else None."""
    if not isinstance(metadata_value, str) or len(metadata_value) > 1024:
        return None
    m = _BEARER_RE.fullmatch(metadata_value)
    return m.group(1) if m else None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ApiKeyStore:
    """API keys in Redis: hash `{prefix}:key:<id>` (digest, tenant, tier, models JSON, created_at, revoked) and set
    `{prefix}:keys` of ids. Works with clients that do or do not decode responses. Redis errors propagate."""

    def __init__(self, redis_client: aioredis.Redis, prefix: str = "lg", pepper: bytes = b"") -> None:
        """`pepper` is a server-side secret: with it digests are HMAC-SHA256(pepper, key), without it SHA-256(key)."""
        self._redis = redis_client
        self._prefix = prefix
        self._pepper = bytes(pepper)
        self._create = redis_client.register_script(_CREATE)
        self._revoke = redis_client.register_script(_REVOKE)

    def _hash_key(self, key_id: str) -> str:
        return f"{self._prefix}:key:{key_id}"

    @property
    def _index_key(self) -> str:
        return f"{self._prefix}:keys"

    def digest(self, key: str) -> str:
        """The hex digest stored for `key`."""
        data = key.encode()
        if self._pepper:
            return hmac.new(self._pepper, data, hashlib.sha256).hexdigest()
        return hashlib.sha256(data).hexdigest()

    async def create(self, tenant: str, tier: str, models: Iterable[str] = ()) -> tuple[KeyRecord, str]:
        """Make a key for `tenant` at `tier`; returns its record and the plaintext key, which is never seen again."""
        validate_name("tenant", tenant)
        validate_name("tier", tier)
        allowed = _validate_models(models)
        for _ in range(5):
            key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(ID_LEN))
            key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
            record = KeyRecord(key_id, tenant, tier, allowed, int(time.time()), False)
            fields = {"digest": self.digest(key), "tenant": tenant, "tier": tier, "models": json.dumps(list(allowed)),
                      "created_at": str(record.created_at), "revoked": "0"}
            args = [x for pair in fields.items() for x in pair] + [key_id]
            if await self._create(keys=[self._hash_key(key_id), self._index_key], args=args):
                return record, key
        raise RuntimeError("could not pick an unused key id")  # pragma: no cover - 62**10 ids

    @staticmethod
    def _record(key_id: str, raw: dict) -> KeyRecord | None:
        h = {_text(k): _text(v) for k, v in raw.items()}
        try:
            models = json.loads(h["models"]) if h.get("models") else []
            return KeyRecord(key_id, h["tenant"], h["tier"], tuple(str(m) for m in models),
                             int(h.get("created_at") or 0), h.get("revoked", "0") == "1")
        except (KeyError, ValueError, TypeError):
            return None

    async def authenticate(self, presented: str, digest: str | None = None) -> KeyRecord | None:
        """The record of a valid, unrevoked key, or None (malformed, unknown, wrong secret, revoked). Digests are
        compared in constant time. Bad input never raises; a Redis failure does (the caller decides fail-closed)."""
        command = self.lookup_command(presented)
        if command is None:
            return None
        return self.verify(presented, await self._redis.execute_command(*command), digest)

    def lookup_command(self, presented: str) -> tuple[str, str] | None:
        """The Redis command whose reply `verify` needs for `presented` (so a caller can pipeline it with other
        commands), or None when `presented` is not even a well-formed key."""
        key_id = parse_key_id(presented)
        return None if key_id is None else ("HGETALL", self._hash_key(key_id))

    def verify(self, presented: str, raw: dict, digest: str | None = None) -> KeyRecord | None:
        """The record of `presented` from the reply to its lookup_command, or None (unknown, wrong secret, revoked,
        malformed). Digests are compared in constant time. `digest`: the caller's digest(presented), if it has it."""
        key_id = parse_key_id(presented)
        if key_id is None:
            return None
        stored = next((_text(v) for k, v in raw.items() if _text(k) == "digest"), None)
        if stored is None or not hmac.compare_digest(stored.encode(), (digest or self.digest(presented)).encode()):
            return None
        record = self._record(key_id, raw)
        return None if record is None or record.revoked else record

    async def get(self, key_id: str) -> KeyRecord | None:
        """The record of one key id, revoked or not, or None when unknown."""
        if not isinstance(key_id, str) or not _ID_RE.fullmatch(key_id):
            return None
        raw = await self._redis.hgetall(self._hash_key(key_id))
        return self._record(key_id, raw) if raw else None

    async def list(self) -> list[KeyRecord]:
        """Every key's record (revoked ones too), oldest first; no digests, no keys."""
        ids = sorted(_text(i) for i in await self._redis.smembers(self._index_key))
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(self._hash_key(key_id))
            raws = await pipe.execute()
        records = [r for key_id, raw in zip(ids, raws, strict=True) if raw and (r := self._record(key_id, raw))]
        return sorted(records, key=lambda r: (r.created_at, r.key_id))

    async def revoke(self, key_id: str) -> bool:
        """Mark a key revoked (idempotent); False when the id is unknown."""
        if not isinstance(key_id, str) or not _ID_RE.fullmatch(key_id):
            return False
        return bool(await self._revoke(keys=[self._hash_key(key_id)]))
