"""`clawbot keys …` and `clawbot usage`: the admin API's operations, straight on the database.

Examples:
    clawbot keys create --name ci-bot --models smollm2 --rpm 60 --tpm 20000 --expires-in 30d
    clawbot keys list
    clawbot keys rotate key_0123456789ab --grace 3600
    clawbot keys revoke key_0123456789ab
    clawbot usage --since 7d --by key_id,model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import msgspec
from sqlalchemy.exc import SQLAlchemyError

from app.api.admin.usage import parse_duration, parse_time
from app.config import load_config
from app.errors import GatewayError, InvalidRequest
from app.ledger.audit import usage_summary
from app.ledger.keys import KeyRecord, KeyStore
from app.ledger.storage.database import Database

T = TypeVar("T")
_LIMIT_FLAGS = (
    ("--rpm", "requests_per_minute", "requests per minute"),
    ("--tpm", "tokens_per_minute", "tokens per minute"),
    ("--max-parallel", "max_parallel", "concurrent requests"),
    ("--budget", "budget_total_tokens", "total token budget"),
    ("--budget-period-tokens", "budget_period_tokens", "token budget per --budget-period"),
)


def add_commands(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Register `keys` and `usage`; returns their handlers by command name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="clawbot.json", help="path to clawbot.json")
    common.add_argument("--json", action="store_true", help="print JSON")
    keys = sub.add_parser("keys", help="manage API keys")
    actions = keys.add_subparsers(dest="action", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text, parents=[common])
        return parser

    create = action("create", "create a key (its plaintext is shown once)")
    create.add_argument("--name", required=True)
    update = action("update", "change a key's settings")
    update.add_argument("key_id")
    update.add_argument("--name")
    for parser in (create, update):
        parser.add_argument("--owner")
        parser.add_argument("--models", help="comma-separated model ids or aliases")
        for flag, field, help_text in _LIMIT_FLAGS:
            parser.add_argument(flag, dest=field, type=int, help=help_text)
        parser.add_argument("--budget-period", choices=["day", "month"])
        parser.add_argument("--expires-in", help="e.g. 30d, 12h (from now)")
    action("list", "list keys").add_argument("--active", action="store_true")
    action("get", "show one key").add_argument("key_id")
    action("revoke", "revoke a key now").add_argument("key_id")
    rotate = action("rotate", "replace a key; the old one works for --grace seconds")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace", type=int, default=3600, help="seconds (default 3600)")
    usage = sub.add_parser("usage", help="requests and tokens per key and model", parents=[common])
    usage.add_argument("--since", default="24h", help="duration (24h, 7d) or ISO time")
    usage.add_argument("--until", help="duration or ISO time (default now)")
    usage.add_argument("--by", default="key_id,model", help="key_id, model, or both")
    return {"keys": keys_command, "usage": usage_command}


def _run(args: argparse.Namespace, work: Callable[[Database], Awaitable[T]]) -> T:
    config = load_config(args.config)
    db = Database(config.database.url)

    async def go() -> T:
        try:
            await db.upgrade()
            return await work(db)
        finally:
            await db.aclose()

    return asyncio.run(go())


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("name", "owner", "budget_period"):
        if getattr(args, name, None) is not None:
            out[name] = getattr(args, name)
    for _, field, _ in _LIMIT_FLAGS:
        if getattr(args, field) is not None:
            out[field] = getattr(args, field)
    if args.models is not None:
        out["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.expires_in is not None:
        lifetime = parse_duration(args.expires_in)
        if lifetime is None:
            raise InvalidRequest(
                f"--expires-in {args.expires_in!r} is not a duration like 30d or 12h",
                param="expires_in",
            )
        out["expires_at"] = datetime.now(UTC) + lifetime
    return out


def _show(args: argparse.Namespace, records: list[dict[str, Any]]) -> None:
    if args.json:
        print(json.dumps(records if len(records) != 1 else records[0], indent=2))
        return
    for r in records:
        state = (
            "revoked"
            if r.get("revoked")
            else ("expires " + r["expires_at"] if r.get("expires_at") else "active")
        )
        models = ",".join(r["models"]) if r.get("models") else "all models"
        print(f"{r['id']}  {r['name']:<20} {r.get('prefix', '')}…  {models}  {state}")
        if "key" in r:
            print(f"\n  key: {r['key']}\n  (shown once: store it now)")


def keys_command(args: argparse.Namespace) -> int:
    """Run one `clawbot keys` action."""

    async def work(db: Database) -> list[dict[str, Any]]:
        store = KeyStore(db)
        if args.action == "create":
            record, plaintext = await store.create(**_settings(args))
            return [{**record.public(), "key": plaintext}]
        if args.action == "update":
            return [(await store.update(args.key_id, **_settings(args))).public()]
        if args.action == "list":
            return [r.public() for r in await store.list(include_revoked=not args.active)]
        if args.action == "revoke":
            return [(await store.revoke(args.key_id)).public()]
        if args.action == "rotate":
            record, plaintext = await store.rotate(args.key_id, args.grace)
            return [{**record.public(), "key": plaintext}]
        found: KeyRecord | None = await store.get(args.key_id)
        if found is None:
            raise _Missing(args.key_id)
        return [found.public()]

    try:
        _show(args, _run(args, work))
    except _Missing as exc:
        print(f"clawbot: no API key with id {exc}", file=sys.stderr)
        return 1
    except GatewayError as exc:
        print(f"clawbot: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, SQLAlchemyError) as exc:
        print(f"clawbot: database failed: {exc}", file=sys.stderr)
        return 1
    return 0


class _Missing(Exception):
    """No key with that id."""


def usage_command(args: argparse.Namespace) -> int:
    """Print requests and tokens per key and model over a period."""
    now = datetime.now(UTC)
    groups = tuple(g.strip() for g in args.by.split(",") if g.strip())

    async def work(db: Database) -> list[Any]:
        return await usage_summary(db, since=since, until=until, group_by=groups)

    try:
        since = parse_time(args.since, now)
        until = parse_time(args.until, now) if args.until else now + timedelta(seconds=1)
        rows = _run(args, work)
    except (GatewayError, ValueError) as exc:
        print(f"clawbot: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    except (OSError, SQLAlchemyError) as exc:
        print(f"clawbot: database failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([msgspec.to_builtins(r) for r in rows], indent=2))
        return 0
    print(
        f"usage from {since.isoformat(timespec='seconds')} to {until.isoformat(timespec='seconds')}"
    )
    print(
        f"{'key':<18} {'model':<28} {'requests':>9} {'errors':>7} {'prompt':>10} {'completion':>11}"
    )
    for r in rows:
        print(
            f"{r.key_id or '-':<18} {r.model or '-':<28} {r.requests:>9} {r.errors:>7} "
            f"{r.prompt_tokens:>10} {r.completion_tokens:>11}"
        )
    return 0
