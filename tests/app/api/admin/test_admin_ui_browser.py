"""The admin dashboard in a real headless Chromium, against a real `clawbot serve` process.

Needs Debian's `chromium` (no browser download: Playwright drives the system one). Without it
the tests are skipped, except under `CI=true`, where they must run (`make test` installs it).
The logged-in page is saved as `test-artifacts/admin-ui.png`.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import AUTH, MASTER_KEY
from tests.serving import Server, serve

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[4]
ARTIFACTS = ROOT / "test-artifacts"
CHAT = {"model": "mock", "messages": [{"role": "user", "content": "hello there"}]}
CONFIG: dict[str, Any] = {
    "auth": {"api_key": MASTER_KEY},
    "models": [
        {
            "id": "mock",
            "deployments": [
                {"name": "mock-primary", "backend": "mock:"},
                {"name": "mock-backup", "backend": "mock:", "priority": 1},
            ],
        },
        {"id": "fixed", "backend": "mock:", "options": {"reply": "one two three"}},
    ],
    "logging": {"level": "WARNING"},
}
WAIT_MS = 20_000
"""How long the page gets to draw (generous: other test runs share the machine)."""


def chromium() -> str:
    """The system Chromium, or skip (fail under CI) saying why."""
    path = os.environ.get("CLAWBOT_TEST_CHROMIUM") or shutil.which("chromium")
    reason = None
    if path is None:
        reason = "chromium is not installed (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "the playwright package is not installed (pip install -e '.[dev]')"
    if reason is None and path is not None:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}, and CI=true requires the browser tests")
    pytest.skip(str(reason))


@dataclass
class Scene:
    """The gateway with keys, traffic and errors the page should show."""

    server: Server
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, self.server.root + path, timeout=30, **kwargs)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def scene(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    """Needs `browser` only to skip before starting a gateway nobody would look at."""
    with serve(CONFIG, tmp_path_factory.mktemp("admin-ui")) as server:
        scene = Scene(server)
        for name, fields in [
            ("alpha", {"models": ["mock"], "requests_per_minute": 600}),
            ("beta", {"tokens_per_minute": 100_000, "max_parallel": 4}),
            ("gamma", {}),
        ]:
            r = scene.call("POST", "/admin/keys", json={"name": name, **fields}, headers=AUTH)
            assert r.status_code == 201, r.text
            scene.keys[name] = r.json()
        scene.call("POST", f"/admin/keys/{scene.keys['gamma']['id']}/revoke", headers=AUTH)

        def chat(key: str, rid: str | None = None, **body: Any) -> int:
            headers = {"Authorization": f"Bearer {scene.keys[key]['key']}"}
            if rid:
                headers["x-request-id"] = rid
            return scene.call(
                "POST", "/v1/chat/completions", json={**CHAT, **body}, headers=headers
            ).status_code

        assert [chat("alpha") for _ in range(3)] == [200] * 3
        assert [chat("beta", model="fixed") for _ in range(2)] == [200] * 2
        assert chat("beta") == 200
        assert chat("alpha", "req-ui-not-allowed", model="fixed") == 403
        assert chat("beta", "req-ui-no-model", model="nope") == 404
        assert chat("gamma", "req-ui-revoked") == 401

        def audited() -> bool:
            r = scene.call("GET", "/admin/errors", headers=AUTH)
            return {"req-ui-not-allowed", "req-ui-no-model", "req-ui-revoked"} <= {
                e["request_id"] for e in r.json()["data"]
            }

        wait_for(audited, "the audit writer")
        yield scene


@dataclass
class Watched:
    """A page, and what it asked for and complained about."""

    page: Any
    urls: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)


@pytest.fixture
def watched(browser: Any) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    seen = Watched(page)
    page.on("request", lambda request: seen.urls.append(request.url))
    page.on("console", lambda m: seen.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: seen.console_errors.append(f"uncaught: {exc}"))
    try:
        yield seen
    finally:
        context.close()


def log_in(page: Any, root: str, key: str) -> None:
    page.goto(f"{root}/admin/ui")
    page.fill("#master-key", key)
    page.click("#login-form button[type=submit]")


def texts(page: Any, selector: str) -> list[str]:
    return [t.strip() for t in page.locator(selector).all_inner_texts()]


def test_dashboard_draws_backends_keys_usage_and_errors(scene: Scene, watched: Watched) -> None:
    page, root = watched.page, scene.server.root
    log_in(page, root, MASTER_KEY)
    page.wait_for_selector("#chart-keys path.series")
    page.wait_for_selector("#chart-models path.series")
    # Locators, not wait_for_function: the page's CSP forbids the eval that polling needs.
    page.locator("#errors tbody td.rid").nth(2).wait_for()
    assert page.locator("#login").is_hidden()

    # Usage: one line per key and per model, a dot for each bucket with requests.
    series = page.locator("#chart-keys path.series")
    assert sorted(series.evaluate_all("ps => ps.map(p => p.dataset.series)")) == [
        "(master key or none)",
        "alpha",
        "beta",
    ]
    assert page.locator("#chart-keys path.series[data-series=alpha]").get_attribute("d")
    models = page.locator("#chart-models path.series").evaluate_all(
        "ps => ps.map(p => p.dataset.series)"
    )
    assert {"mock", "fixed"} <= set(models)
    legend = " ".join(texts(page, "#legend-keys li"))
    assert "alpha" in legend
    assert "beta" in legend
    assert page.locator("#chart-keys circle.point").count() >= 2

    backends = texts(page, "#backends tbody tr")
    assert len(backends) == 3
    assert any("mock-primary" in b and "yes" in b for b in backends)
    assert any("mock-backup" in b for b in backends)
    assert any(b.startswith("fixed") for b in backends)

    keys = {r.split("\t")[0]: r for r in texts(page, "#keys tbody tr")}
    assert set(keys) == {"alpha", "beta", "gamma"}
    assert "600 rpm" in keys["alpha"]
    assert "mock" in keys["alpha"]
    assert "revoked" in keys["gamma"]
    assert "4 parallel" in keys["beta"]

    errors = texts(page, "#errors tbody tr")
    by_id = {e.split("\t")[-1]: e for e in errors}
    assert "403" in by_id["req-ui-not-allowed"]
    assert "alpha" in by_id["req-ui-not-allowed"]
    assert "model_not_found" in by_id["req-ui-no-model"]
    assert "invalid_api_key" in by_id["req-ui-revoked"]

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "admin-ui.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"admin UI screenshot: {shot}")

    # Nothing from elsewhere, nothing the CSP blocked, no script errors.
    assert watched.urls
    assert all(u.startswith(root + "/") or u.startswith("data:") for u in watched.urls)
    assert watched.console_errors == []

    # It refreshes by itself: a new failure shows up without a reload.
    r = scene.call(
        "POST",
        "/v1/chat/completions",
        json={**CHAT, "model": "nope"},
        headers={
            "Authorization": f"Bearer {scene.keys['alpha']['key']}",
            "x-request-id": "req-ui-later",
        },
    )
    assert r.status_code == 404
    page.wait_for_selector("#errors td.rid:text-is('req-ui-later')", timeout=30_000)
    assert int(page.evaluate("document.body.dataset.refreshes")) >= 2

    # The key lasts the tab's session: a reload needs no new login; logging out forgets it.
    page.reload()
    page.wait_for_selector("#chart-keys path.series")
    assert page.locator("#login").is_hidden()
    page.click("#logout")
    assert page.locator("#login").is_visible()
    assert page.evaluate("sessionStorage.length") == 0


def test_a_wrong_key_is_refused_on_the_page(scene: Scene, watched: Watched) -> None:
    page, root = watched.page, scene.server.root
    log_in(page, root, "sk-not-the-master-key")
    error = page.locator("#login-error")
    error.wait_for(state="visible")
    assert "invalid master key" in error.inner_text()
    assert page.locator("#dashboard").is_hidden()
    assert page.evaluate("sessionStorage.length") == 0

    page.fill("#master-key", scene.keys["alpha"]["key"])
    page.click("#login-form button[type=submit]")
    page.locator("#login-error", has_text="not an API key").wait_for()
    assert page.locator("#dashboard").is_hidden()
    assert page.locator("#backends tbody tr").count() == 0
