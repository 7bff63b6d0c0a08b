"""`llamagrid keys create|list|revoke`: manage router API keys in Redis."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import UTC, datetime

from redis.exceptions import RedisError

from ratelimit.limiter import connect
from router.keys import ApiKeyStore

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
PEPPER_ENV = "LLAMAGRID_KEY_PEPPER"


def _store_call(args: argparse.Namespace, op):
    """Run `await op(store)` against the Redis at `args.redis_url`; the pepper comes from $LLAMAGRID_KEY_PEPPER."""

    async def main():
        client = connect(args.redis_url, timeout_s=args.timeout)
        try:
            store = ApiKeyStore(client, prefix=args.prefix, pepper=os.environ.get(PEPPER_ENV, "").encode())
            return await op(store)
        finally:
            await client.aclose()

    return asyncio.run(main())


def _fail(message: str) -> int:
    print(f"llamagrid keys: {message}", file=sys.stderr)
    return 2


def cmd_create(args: argparse.Namespace) -> int:
    """Create a key; print it once on stdout and its id/tenant/tier on stderr."""
    try:
        record, key = _store_call(args, lambda s: s.create(args.tenant, args.tier, args.model or ()))
    except ValueError as e:
        return _fail(str(e))
    except (RedisError, OSError) as e:
        return _fail(f"redis error: {e}")
    models = ",".join(record.models) or "*"
    print(f"created key id={record.key_id} tenant={record.tenant} tier={record.tier} models={models}", file=sys.stderr)
    print(key, flush=True)
    return 0


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def cmd_list(args: argparse.Namespace) -> int:
    """Print a table of keys: id, tenant, tier, models, created, revoked (never keys or digests)."""
    try:
        records = _store_call(args, lambda s: s.list())
    except (RedisError, OSError) as e:
        return _fail(f"redis error: {e}")
    rows = [("ID", "TENANT", "TIER", "MODELS", "CREATED", "REVOKED")]
    rows += [(r.key_id, r.tenant, r.tier, ",".join(r.models) or "*", _iso(r.created_at), "yes" if r.revoked else "no")
             for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    """Revoke a key by id; exit 1 when the id is unknown."""
    try:
        found = _store_call(args, lambda s: s.revoke(args.key_id))
    except (RedisError, OSError) as e:
        return _fail(f"redis error: {e}")
    if not found:
        print(f"llamagrid keys: no key with id {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"revoked key id={args.key_id}", file=sys.stderr)
    return 0


def add_keys_parser(subparsers) -> argparse.ArgumentParser:
    """Register `keys` with subcommands create/list/revoke; each sets `func(args) -> exit code`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--redis-url", default=os.environ.get("LLAMAGRID_REDIS_URL") or DEFAULT_REDIS_URL,
                        help="Redis holding the keys (default: $LLAMAGRID_REDIS_URL or %(default)s)")
    common.add_argument("--prefix", default="lg", help="Redis key prefix (default: %(default)s)")
    common.add_argument("--timeout", type=float, default=2.0, help="Redis socket timeout in seconds")

    keys = subparsers.add_parser("keys", help="create, list or revoke router API keys")
    sub = keys.add_subparsers(dest="keys_command", required=True)

    c = sub.add_parser("create", parents=[common], help="create a key (printed once on stdout)")
    c.add_argument("--tenant", required=True)
    c.add_argument("--tier", required=True)
    c.add_argument("--model", action="append", default=[], help="allow this model (repeatable; none = all models)")
    c.set_defaults(func=cmd_create)

    ls = sub.add_parser("list", parents=[common], help="list keys (ids and metadata only)")
    ls.set_defaults(func=cmd_list)

    r = sub.add_parser("revoke", parents=[common], help="revoke a key by id")
    r.add_argument("key_id", metavar="ID")
    r.set_defaults(func=cmd_revoke)
    return keys
