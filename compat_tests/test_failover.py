"""The official SDK sees no error when a model's primary deployment dies: the backup answers.

The gateway here serves `chat` from a pool of two `tests/fake_upstream.py` processes under
priority failover; the primary is SIGKILLed before, or while, the SDK sends requests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from openai import OpenAI
from openai.types import CompletionUsage

from compat_tests.openapi_schema import validate
from compat_tests.support import API_KEY, json_body
from tests.fake_upstream import Upstream
from tests.serving import ServerDidNotStart, serve

MODEL = "chat"
USER = [{"role": "user", "content": "hello"}]
CHUNKS = 4


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[tuple[OpenAI, Upstream]]:
    """An SDK client to a gateway whose `chat` fails over from `primary` to `backup`."""
    with (
        Upstream("primary", chunks=CHUNKS, log_dir=tmp_path) as primary,
        Upstream("backup", chunks=CHUNKS, log_dir=tmp_path) as backup,
    ):
        config = {
            "model_server": {"host": "127.0.0.1", "timeout": 30_000},
            "auth": {"api_key": API_KEY},
            "audit": {"enabled": False},
            "logging": {"level": "WARNING"},
            "models": [
                {
                    "id": MODEL,
                    "routing": {"strategy": "priority", "retries": 2},
                    "deployments": [
                        {
                            "name": upstream.name,
                            "backend": upstream.url,
                            "priority": priority,
                            "upstream_model": "fake",
                        }
                        for priority, upstream in enumerate((primary, backup))
                    ],
                }
            ],
        }
        try:
            with (
                serve(config, tmp_path / "gateway") as server,
                OpenAI(
                    base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=30
                ) as client,
            ):
                yield client, primary
        except ServerDidNotStart as exc:
            pytest.fail(str(exc))


def create(client: OpenAI) -> tuple[str, str]:
    """A non-streamed completion, validated: the deployment that served it, and its text."""
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=USER)
    body = json_body(raw)
    validate("CreateChatCompletionResponse", body)
    completion = raw.parse()
    assert completion.model == MODEL
    assert completion.choices[0].finish_reason == "stop"
    text = completion.choices[0].message.content
    assert text is not None
    return raw.headers["x-clawbot-backend"], text


def create_stream(client: OpenAI) -> str:
    """A streamed completion iterated to its end, every chunk validated; its text."""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
    )
    text: list[str] = []
    finishes: list[str] = []
    usage: CompletionUsage | None = None
    with stream:
        for chunk in stream:
            validate(
                "CreateChatCompletionStreamResponse",
                chunk.model_dump(mode="json", exclude_unset=True),
            )
            assert chunk.model == MODEL
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                if choice.finish_reason is not None:
                    finishes.append(choice.finish_reason)
            usage = chunk.usage or usage
    assert finishes == ["stop"]
    assert usage is not None
    assert usage.completion_tokens == CHUNKS
    return "".join(text)


def test_primary_killed_before_requests(pool: tuple[OpenAI, Upstream]) -> None:
    client, primary = pool
    assert create(client) == (f"{MODEL}/primary", "hello from primary")
    assert create_stream(client) == "primary " * CHUNKS
    primary.kill()
    for _ in range(3):
        assert create(client) == (f"{MODEL}/backup", "hello from backup")
        assert create_stream(client) == "backup " * CHUNKS


def test_primary_killed_while_requests_run(pool: tuple[OpenAI, Upstream]) -> None:
    client, primary = pool
    stop = threading.Event()

    def keep_asking() -> list[tuple[str, str]]:
        answers: list[tuple[str, str]] = []
        while not stop.is_set():
            answers.append(create(client))
        return answers

    with ThreadPoolExecutor(4) as threads:
        running = [threads.submit(keep_asking) for _ in range(4)]
        try:
            time.sleep(0.5)
            primary.kill()
            time.sleep(1.0)
        finally:
            stop.set()
        answers = [answer for future in running for answer in future.result()]
    assert set(answers) == {
        (f"{MODEL}/primary", "hello from primary"),
        (f"{MODEL}/backup", "hello from backup"),
    }
    assert {future.result()[-1][0] for future in running} == {f"{MODEL}/backup"}
    assert create_stream(client) == "backup " * CHUNKS
