"""The real PostgreSQL and Redis on this machine (and other things tests need from outside the
project): skip without them, but fail under CI."""

from __future__ import annotations

import os
import socket

import pytest

POSTGRES_URL = os.environ.get(
    "CLAWBOT_TEST_POSTGRES", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("CLAWBOT_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def unavailable(reason: str) -> None:
    """Skip the test on a user's machine that lacks what it needs; fail in CI, where it must
    run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}, and CI=true requires it")
    pytest.skip(reason)


def require(service: str, host: str, port: int) -> None:
    """Skip the test when the service is down on a user's machine; fail in CI, where it must run."""
    if not _reachable(host, port):
        unavailable(f"{service} is not reachable on {host}:{port}")


def require_postgres() -> None:
    """PostgreSQL on 127.0.0.1:5432."""
    require("PostgreSQL", "127.0.0.1", 5432)


def require_redis() -> None:
    """Redis on 127.0.0.1:6379."""
    require("Redis", "127.0.0.1", 6379)
