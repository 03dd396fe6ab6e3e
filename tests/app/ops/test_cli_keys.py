"""`clawbot keys …` and `clawbot usage` on a SQLite file next to clawbot.json."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from app.ledger.audit import AuditEntry, AuditWriter
from app.ledger.keys import hash_key
from app.ledger.storage.database import Database
from app.ops.cli import main


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "clawbot.json"
    path.write_text(json.dumps({"models": [{"id": "m", "backend": "mock:"}]}))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, json.loads(out) if "--json" in argv and code == 0 else out


def test_key_lifecycle(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = str(config)
    code, created = run(
        capsys, "keys", "create", "--name", "bot", "--models", "m,other", "--rpm", "60",
        "--budget-period-tokens", "1000", "--budget-period", "day", "--expires-in", "2d",
        "--config", c, "--json",
    )  # fmt: skip
    assert code == 0
    assert created["key"].startswith("sk-clawbot-")
    assert created["models"] == ["m", "other"]
    assert created["requests_per_minute"] == 60
    assert created["budget_period"] == "day"
    code, listed = run(capsys, "keys", "list", "--config", c, "--json")
    assert listed["id"] == created["id"]
    assert "key" not in listed
    code, text = run(capsys, "keys", "list", "--config", c)
    assert created["id"] in text
    assert created["key"] not in text
    code, rotated = run(
        capsys, "keys", "rotate", created["id"], "--grace", "0", "--config", c, "--json"
    )
    assert code == 0
    assert rotated["id"] != created["id"]
    code, revoked = run(capsys, "keys", "revoke", rotated["id"], "--config", c, "--json")
    assert revoked["revoked"] is True
    code, active = run(capsys, "keys", "list", "--active", "--config", c, "--json")
    assert active == []
    code, updated = run(
        capsys, "keys", "update", created["id"], "--name", "renamed", "--config", c, "--json"
    )
    assert updated["name"] == "renamed"


def test_only_the_hash_is_stored(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, created = run(capsys, "keys", "create", "--name", "x", "--config", str(config), "--json")
    raw = (config.parent / "clawbot.db").read_bytes()
    assert created["key"].encode() not in raw
    assert hash_key(created["key"]).encode() in raw


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["keys", "revoke", "key_000000000000"], "no API key"),
        (["keys", "get", "key_000000000000"], "no API key"),
        (["keys", "create", "--name", "x", "--rpm", "0"], "requests_per_minute"),
        (["keys", "create", "--name", "x", "--expires-in", "2027-01-01"], "not a duration"),
        (["usage", "--since", "yesterday-ish"], "neither a duration"),
        (["usage", "--by", "colour"], "cannot group usage by 'colour'"),
    ],
)
def test_errors_exit_1(
    config: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main([*argv, "--config", str(config)]) == 1
    assert message in capsys.readouterr().err


def test_usage(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def record() -> None:
        db = Database(f"sqlite+aiosqlite:///{config.parent / 'clawbot.db'}")
        await db.upgrade()
        writer = AuditWriter(db)
        now = datetime.now(UTC)
        for status in (200, 200, 500):
            writer.submit(
                AuditEntry(
                    request_id=f"r{status}",
                    ts=now,
                    key_id="key_a",
                    route="/v1/chat/completions",
                    model="m",
                    status=status,
                    latency_ms=1.0,
                    prompt_tokens=3,
                    completion_tokens=4,
                )
            )
        await writer.aclose()
        await db.aclose()

    asyncio.run(record())
    code, rows = run(capsys, "usage", "--since", "1h", "--config", str(config), "--json")
    assert code == 0
    assert rows == [
        {
            "key_id": "key_a",
            "model": "m",
            "requests": 3,
            "errors": 1,
            "prompt_tokens": 9,
            "completion_tokens": 12,
            "total_tokens": 21,
        }
    ]
    code, text = run(capsys, "usage", "--by", "model", "--config", str(config))
    assert "m" in text
    assert " 3 " in text
