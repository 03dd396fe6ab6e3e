"""Shared fixtures: a gateway on mock backends behind Litestar's async test client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from app.config import Config, parse_config
from app.gateway import Gateway
from app.server import create_app

MASTER_KEY = "sk-test-master"
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}


def make_config(
    models: list[dict[str, Any]] | None = None, api_key: str = MASTER_KEY, **server: Any
) -> Config:
    """A config with mock models unless others are given."""
    if models is None:
        models = [
            {"id": "mock", "aliases": ["gpt-4o-mini"], "backend": "mock:", "context_length": 4096},
            {"id": "fixed", "backend": "mock:", "options": {"reply": "one two three four five"}},
            {"id": "broken", "backend": "mock:", "options": {"fail_after_tokens": 2}},
        ]
    return parse_config(
        {
            "model_server": server,
            "auth": {"api_key": api_key},
            "database": {"url": "sqlite+aiosqlite://"},  # in memory
            "models": models,
        }
    )


ClientFactory = Callable[..., Any]


@pytest.fixture
async def client() -> AsyncIterator[AsyncTestClient[Any]]:
    """A started gateway with the default mock models and the master key."""
    async with AsyncTestClient(app=create_app(Gateway.from_config(make_config()))) as c:  # type: ignore[arg-type]
        yield c


@pytest.fixture
def make_client() -> Callable[[Config], AsyncTestClient[Any]]:
    """Build a test client for a custom config (use it as an async context manager)."""

    def build(config: Config) -> AsyncTestClient[Any]:
        return AsyncTestClient(app=create_app(Gateway.from_config(config)))  # type: ignore[arg-type]

    return build
