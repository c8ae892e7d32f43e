"""A real server on loopback and a real headless Chromium (Debian's package) driven by Playwright.

Without /usr/bin/chromium (or the playwright package) these tests skip with the reason,
except under CI=true where that is a failure: `.ci/run` installs chromium when it is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controltower.engine import EmbeddedEngine
from controltower.spec.loader import load_spec_file
from controltower.spec.models import WorkflowSpec

CHROMIUM = os.environ.get("TOWER_TEST_CHROMIUM", "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
REFUNDS = ROOT / "examples" / "refunds"
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
PASSWORD = "correct horse battery"


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install -y --no-install-recommends chromium)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install 'controltower[test]')"
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {reason}")
        pytest.skip(reason)
    return CHROMIUM


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Tower:
    """The server under test: its URL and the objects behind it (same event loop as the test)."""

    url: str
    engine: EmbeddedEngine
    gateway: Any
    auth: Any
    refunds: WorkflowSpec

    async def refund_run(self, amount_cents: int = 4200, tenant: str = "default") -> str:
        """A refunds run parked on the finance group's approval of its refund."""
        run_id = await self.engine.start(
            self.refunds,
            {"ticket": "T-1", "amount_cents": amount_cents},
            base_dir=str(REFUNDS),
            tenant=tenant,
        )
        run = await self.engine.wait(run_id, statuses=("waiting",), timeout=10)
        assert run.status == "waiting", run.error
        return run_id


@pytest.fixture
async def tower(tmp_path: Path) -> AsyncIterator[Tower]:
    """The server on a fresh SQLite file (``test_pages`` runs its tests on PostgreSQL as well)."""
    async with serve(f"sqlite:///{tmp_path / 'tower.db'}") as running:
        yield running


@contextlib.asynccontextmanager
async def serve(store_url: str) -> AsyncIterator[Tower]:
    import uvicorn

    from controltower.api.app import create_app
    from controltower.api.deps import Services
    from controltower.auth import AuthService
    from controltower.gateway.engine_gate import GovernedToolGate
    from controltower.gateway.pipeline import open_gateway

    engine = await EmbeddedEngine.open(store_url, poll_interval=0.05)
    gateway = await open_gateway(engine.store, policies=str(REFUNDS / "policies"))
    engine.tool_gate = GovernedToolGate(gateway)
    auth = AuthService(engine.store)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    services = Services(store=engine.store, engine=engine, gateway=gateway, auth=auth, base_url=url)
    config = uvicorn.Config(
        create_app(services), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.02)
    assert server.started, "uvicorn did not start"
    spec = load_spec_file(REFUNDS / "workflow.yaml")
    try:
        yield Tower(url, engine, gateway, auth, spec)
    finally:
        server.should_exit = True
        await task
        await engine.close()


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=chromium, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


async def login(browser: Any, url: str, tenant: str, username: str, *, path: str = "/ui/runs") -> Any:
    """A fresh browser context signed in through the login form, typing as a user would."""
    context = await browser.new_context(viewport={"width": 1366, "height": 900})
    page = await context.new_page()
    await page.goto(url + path)
    assert "/ui/login" in page.url
    await page.get_by_label("Tenant").fill(tenant)
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_label("Password").press("Enter")
    await page.wait_for_url(f"**{path}")
    return page
