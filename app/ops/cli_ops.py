"""`clawbot check`, `clawbot backup` and `clawbot restore`.

Examples:
    clawbot check --config clawbot.json          # the CPU and llama.cpp build, then one OK/FAIL
                                                 # line per deployment, each with a fix
    clawbot check --json                         # the same, as JSON for scripts
    clawbot backup --out /backups/clawbot-2026-01-31.tar.gz
    clawbot backup --out /backups/today/ --include-models
    clawbot restore --from /backups/clawbot-2026-01-31.tar.gz --config clawbot.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy.exc import SQLAlchemyError

from app.config import Config, ConfigError, load_config, model_deployments
from app.core.gateway import Gateway
from app.ops.backup import BackupError, Manifest, create_backup, restore_backup
from app.ops.diagnose import Check, run_checks
from app.ops.llama_build import check_llama_build
from app.ops.tls import ssl_context_factory
from backends.base import backend_scheme


def add_commands(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Register `check`, `backup` and `restore`; returns their handlers by command name."""
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", default="clawbot.json", help="path to clawbot.json")
    check = sub.add_parser(
        "check",
        help="validate the config and probe the database and every deployment",
        parents=[config],
    )
    check.add_argument("--json", action="store_true", help="print one JSON object")
    backup = sub.add_parser(
        "backup", help="save the config, the database and a manifest of checksums", parents=[config]
    )
    backup.add_argument(
        "--out", required=True, type=Path, help="a new directory, or a file ending in .tar.gz"
    )
    backup.add_argument(
        "--include-models",
        action="store_true",
        help="also copy the in-process model files (by default only their checksums)",
    )
    restore = sub.add_parser(
        "restore", help="verify a backup, then restore its config and database", parents=[config]
    )
    restore.add_argument(
        "--from", dest="source", required=True, type=Path, help="a backup directory or .tar.gz"
    )
    restore.add_argument(
        "--force",
        action="store_true",
        help="replace a config that differs and a database that holds data",
    )
    return {"check": check_command, "backup": backup_command, "restore": restore_command}


def check_command(args: argparse.Namespace) -> int:
    """0 when everything passed, 1 when a check failed, 2 when the config is invalid."""
    try:
        config = load_config(args.config)
        ssl_context_factory(config.model_server)  # a bad TLS certificate or key, as serve
        gateway = Gateway.from_config(config)
    except ConfigError as exc:
        failed = Check(target="config", ok=False, problem="config_error", message=str(exc))
        _print_checks(args, [failed])
        return 2
    checks = asyncio.run(_run_checks(config, gateway))
    _print_checks(args, checks)
    if all(c.ok for c in checks):
        if not args.json:
            print(f"OK: {args.config} is valid; {len(config.models)} model(s) ready")
        return 0
    return 1


async def _run_checks(config: Config, gateway: Gateway) -> list[Check]:
    try:
        build = await check_llama_build() if _runs_in_process(config) else []
        return [*build, *await run_checks(config, gateway)]
    finally:
        await gateway.aclose()


def _runs_in_process(config: Config) -> bool:
    return any(
        backend_scheme(dep.backend) == "llamacpp"
        for model in config.models
        for dep in model_deployments(model)
    )


def _print_checks(args: argparse.Namespace, checks: list[Check]) -> None:
    if args.json:
        report = {
            "ok": all(c.ok for c in checks),
            "config": str(args.config),
            "checks": msgspec.to_builtins(checks),
        }
        print(json.dumps(report, indent=2))
        return
    for check in checks:
        print(check.line(), file=sys.stdout if check.ok else sys.stderr, flush=True)


def backup_command(args: argparse.Namespace) -> int:
    """Write a backup; 1 with a message when it cannot."""
    try:
        manifest = create_backup(Path(args.config), args.out, include_models=args.include_models)
    except (BackupError, OSError, SQLAlchemyError) as exc:
        print(f"clawbot: backup failed: {exc}", file=sys.stderr)
        return 1
    print(f"backup written to {args.out}")
    _describe(manifest)
    for model in manifest.models:
        kept = "copied" if model.archived_as else "checksum only (--include-models copies it)"
        print(f"  model file {model.path} ({_size(model.size)}): {kept}")
    return 0


def restore_command(args: argparse.Namespace) -> int:
    """Restore a backup; 1 with a message when it is refused or fails."""
    try:
        report = restore_backup(args.source, Path(args.config), force=args.force)
    except BackupError as exc:
        print(f"clawbot: restore refused: {exc}", file=sys.stderr)
        return 1
    except (OSError, SQLAlchemyError) as exc:
        print(f"clawbot: restore failed: {exc}", file=sys.stderr)
        return 1
    manifest = report.manifest
    state = "restored to" if report.config_written else "already matches the backup:"
    print(f"restored the backup of {manifest.created} (clawbot {manifest.clawbot_version})")
    print(f"  config {state} {args.config}")
    _describe(manifest)
    for path in report.restored_models:
        print(f"  model file {path} restored")
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _describe(manifest: Manifest) -> None:
    database = manifest.database
    rows = ", ".join(f"{name}: {count} rows" for name, count in database.tables.items())
    print(
        f"  database: {database.dialect}, revision {manifest.alembic_revision or 'none'}"
        f" ({rows or 'no tables'})"
    )


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
