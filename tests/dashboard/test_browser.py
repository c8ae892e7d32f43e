"""The dashboard in a real browser: sign in, follow a run, decide its approval, watch it finish;
roles and tenants limit what each user sees and may do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

try:
    from playwright.async_api import expect
except ImportError:  # the `chromium` fixture skips (or fails under CI) with the reason
    expect = None

from .conftest import PASSWORD, Tower, login

pytestmark = pytest.mark.slow  # a Chromium subprocess per test


async def test_approver_signs_in_decides_in_the_inbox_and_the_run_completes(
    tower: Tower, browser: Any, artifacts: Path
) -> None:
    await tower.auth.create_user("default", "fiona", PASSWORD, ["approver"], ["finance"])
    run_id = await tower.refund_run()

    page = await login(browser, tower.url, "default", "fiona")
    cookie = next(c for c in await page.context.cookies() if c["name"] == "tower_session")
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Lax"
    await expect(page.get_by_role("link", name=run_id)).to_be_visible()
    await page.screenshot(path=str(artifacts / "01-runs.png"), full_page=True)
    await page.keyboard.press("Tab")  # the first stop skips the navigation
    await expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    await page.keyboard.press("Tab")
    await expect(page.get_by_role("link", name="Control Tower")).to_be_focused()

    await page.get_by_role("link", name=run_id).click()
    await expect(page.get_by_test_id("run-status")).to_have_text("waiting")
    await expect(page.get_by_text("charges", exact=True)).to_be_visible()  # the timeline's first step
    await page.screenshot(path=str(artifacts / "02-run-waiting.png"), full_page=True)

    # a second tab stays on the run page: HTMX polling must show the run finish without a reload
    watcher = await page.context.new_page()
    await watcher.goto(page.url)
    await expect(watcher.get_by_test_id("run-status")).to_have_text("waiting")
    first_step = watcher.locator("li.step details").first
    await first_step.locator("summary").click()  # the reader opens a finished step...

    await page.get_by_role("link", name="Approvals", exact=True).click()
    card = page.locator("article.approval")
    await expect(card).to_have_count(1)
    await expect(card).to_contain_text("refunds.issue_refund")
    await expect(card).to_contain_text("group finance")
    await expect(card.get_by_test_id("approval-args")).to_contain_text('"amount_cents": 4200')
    await page.screenshot(path=str(artifacts / "03-inbox.png"), full_page=True)

    # keyboard only: focus the approve button and press Enter
    await card.get_by_role("button", name="Approve", exact=True).focus()
    await page.keyboard.press("Enter")
    await expect(page.get_by_test_id("approval-status")).to_have_text("approved")

    await expect(watcher.get_by_test_id("run-status")).to_have_text("completed", timeout=10_000)
    await expect(watcher.get_by_test_id("run-output")).to_contain_text("refunded_cents")
    await expect(first_step).to_have_attribute("open", "")  # ...and the refreshes leave it open
    await page.get_by_role("link", name="Follow the run").click()
    await expect(page.get_by_test_id("run-status")).to_have_text("completed", timeout=10_000)
    await expect(page.get_by_test_id("run-output")).to_contain_text("refunded_cents")
    await page.screenshot(path=str(artifacts / "04-run-completed.png"), full_page=True)
    run = await tower.engine.get(run_id)
    assert run.status == "completed"
    approvals = await tower.gateway.approvals.list(status=None, run_id=run_id)
    assert [(a.status, a.decided_by, a.decided_role) for a in approvals] == [
        ("approved", "fiona", "approver")
    ]

    await page.goto(f"{tower.url}/ui/approvals")
    await expect(page.get_by_text("Nothing is waiting for a decision.")).to_be_visible()
    await expect(page.locator("#hist-h + table")).to_contain_text("fiona")

    await page.goto(f"{tower.url}/ui/workflows/refunds")
    await expect(page.locator("svg.chart")).to_have_count(5)
    await expect(page.get_by_text("Fully automated")).to_be_visible()
    await page.screenshot(path=str(artifacts / "05-workflow.png"), full_page=True)

    await page.goto(f"{tower.url}/ui/tools/refunds.issue_refund")
    who = page.locator("#who-h + table")
    await expect(who).to_contain_text("refunds-need-finance")
    await expect(who).to_contain_text("finance")
    await page.screenshot(path=str(artifacts / "06-tool.png"), full_page=True)

    await page.goto(f"{tower.url}/ui/audit?run_id={run_id}")
    await expect(page.get_by_test_id("audit-verdict")).to_contain_text("Chain intact")
    await expect(page.locator("table.audit")).to_contain_text("user:fiona")
    await page.screenshot(path=str(artifacts / "07-audit.png"), full_page=True)

    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url("**/ui/login")
    await page.goto(f"{tower.url}/ui/runs")
    assert "/ui/login" in page.url


async def test_a_viewer_cannot_decide_and_another_tenant_sees_nothing(
    tower: Tower, browser: Any, artifacts: Path
) -> None:
    await tower.auth.create_user("default", "victor", PASSWORD, ["viewer"])
    await tower.auth.create_user("default", "olga", PASSWORD, ["approver"], ["legal"])
    await tower.auth.create_user("globex", "bob", PASSWORD, ["admin"], ["finance"])
    run_id = await tower.refund_run()
    (pending,) = await tower.gateway.approvals.list()

    viewer = await login(browser, tower.url, "default", "victor", path="/ui/approvals")
    card = viewer.locator("article.approval")
    await expect(card).to_contain_text("refunds.issue_refund")
    await expect(card.get_by_test_id("cannot-decide")).to_be_visible()
    await expect(viewer.get_by_role("button", name="Approve")).to_have_count(0)
    await viewer.screenshot(path=str(artifacts / "10-viewer-inbox.png"), full_page=True)
    csrf = await viewer.locator("input[name=csrf]").first.input_value()
    forged = await viewer.request.post(
        f"{tower.url}/ui/approvals/{pending.id}", form={"csrf": csrf, "action": "approve"}, max_redirects=0
    )
    assert forged.status == 403
    no_token = await viewer.request.post(
        f"{tower.url}/ui/approvals/{pending.id}", form={"action": "approve"}, max_redirects=0
    )
    assert no_token.status == 400

    # an approver of the wrong group sees the request but may not decide it
    wrong_group = await login(browser, tower.url, "default", "olga", path=f"/ui/approvals/{pending.id}")
    await expect(wrong_group.get_by_test_id("cannot-decide")).to_contain_text("group finance")
    csrf = await wrong_group.locator("input[name=csrf]").first.input_value()
    denied = await wrong_group.request.post(
        f"{tower.url}/ui/approvals/{pending.id}", form={"csrf": csrf, "action": "approve"}, max_redirects=0
    )
    assert denied.status == 403

    other = await login(browser, tower.url, "globex", "bob")
    await expect(other.get_by_text("No runs.")).to_be_visible()
    body = await other.content()
    assert run_id not in body
    for path in (f"/ui/runs/{run_id}", f"/ui/approvals/{pending.id}", "/ui/workflows/refunds"):
        response = await other.goto(tower.url + path)
        assert response is not None
        assert response.status == 404, path
    live = await other.request.get(f"{tower.url}/ui/runs/{run_id}/live")
    assert live.status == 404
    for path in ("/ui/approvals", "/ui/workflows", "/ui/tools", "/ui/audit"):
        await other.goto(tower.url + path)
        text = await other.content()
        for secret in (run_id, pending.id, "refunds"):
            assert secret not in text, path
    csrf = await other.locator("input[name=csrf]").first.input_value()
    across = await other.request.post(
        f"{tower.url}/ui/approvals/{pending.id}", form={"csrf": csrf, "action": "approve"}, max_redirects=0
    )
    assert across.status == 404
    await other.goto(f"{tower.url}/ui/approvals")
    await other.screenshot(path=str(artifacts / "11-other-tenant.png"), full_page=True)

    still = await tower.gateway.approvals.get(pending.id)
    assert still.status == "pending"
    assert (await tower.engine.get(run_id)).status == "waiting"
