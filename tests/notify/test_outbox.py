"""Approval steps notify; deliveries go through the durable outbox (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.notify.conftest import Receiver

from controltower.engine import EmbeddedEngine
from controltower.notify import Notification, Notifier, WebhookChannel
from controltower.spec.models import WorkflowSpec
from controltower.store import open_store

BASE = "https://tower.example.com"

APPROVAL = WorkflowSpec.model_validate(
    {
        "name": "payouts",
        "steps": [
            {
                "id": "sign_off",
                "kind": "approval",
                "title": "Finance sign-off",
                "prompt": "Pay the vendor?",
                "group": "finance",
                "sla": "1h",
            }
        ],
    }
)


def fields_of(body: dict[str, object]) -> dict[str, str]:
    blocks = body["blocks"]
    assert isinstance(blocks, list)
    return {
        f["text"].split("\n")[0].strip("*"): f["text"].split("\n")[1]
        for f in blocks[2]["fields"]  # the fields section
    }


async def test_an_approval_step_notifies_once_with_a_link_to_the_run(
    engine: EmbeddedEngine, receiver: Receiver
) -> None:
    notifier = Notifier([WebhookChannel(receiver.url)], base_url=BASE, store=engine.store, poll_interval=0.05)
    notifier.attach(engine=engine)
    notifier.attach(engine=engine)  # twice changes nothing
    notifier.start()
    before = time.time()
    run_id = await engine.start(APPROVAL, {})
    await engine.wait(run_id, statuses=("waiting",), timeout=10)
    # an unrelated event wakes the run: it replays and parks at the same approval again
    await engine.signal(run_id, "nudge")
    await engine.wait(run_id, statuses=("waiting",), timeout=10)
    await notifier.flush(10)
    await engine.approve(run_id, "sign_off", by="alice")
    assert (await engine.wait(run_id, timeout=10)).status == "completed"
    await notifier.flush(10)
    await notifier.aclose()

    assert len(receiver.bodies) == 1, receiver.bodies
    body = receiver.bodies[0]
    link = f"{BASE}/ui/runs/{run_id}"
    assert body["blocks"][0]["text"]["text"] == "Approval needed: Finance sign-off"
    assert link in body["text"]
    assert body["blocks"][-1]["elements"][0]["url"] == link
    assert "Pay the vendor?" in body["blocks"][1]["text"]["text"]
    fields = fields_of(body)
    assert fields["Group"] == "finance"
    assert fields["Step"] == "sign_off"
    due = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(before + 3600))
    assert fields["Due"] in (due, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(before + 3660)))
    assert notifier.outbox is not None
    (row,) = await notifier.outbox.rows()
    assert (row.status, row.attempts, row.event) == ("sent", 1, "approval_requested")
    assert row.channel == "webhook:127.0.0.1"


async def test_an_escalated_approval_step_notifies_the_new_group(
    engine: EmbeddedEngine, receiver: Receiver
) -> None:
    spec = WorkflowSpec.model_validate(
        {
            "name": "escalates",
            "steps": [
                {
                    "id": "ok",
                    "kind": "approval",
                    "group": "support",
                    "sla": "0.2s",
                    "on_timeout": "escalate",
                    "escalate_to": "support-leads",
                }
            ],
        }
    )
    notifier = Notifier([WebhookChannel(receiver.url)], base_url=BASE, store=engine.store, poll_interval=0.05)
    notifier.attach(engine=engine)
    notifier.start()
    run_id = await engine.start(spec, {})
    await engine.wait(run_id, statuses=("waiting",), timeout=10)
    deadline = time.monotonic() + 10
    while len(receiver.bodies) < 2 and time.monotonic() < deadline:
        await notifier.flush(1)
    await notifier.aclose()
    titles = [b["blocks"][0]["text"]["text"] for b in receiver.bodies]
    assert titles == ["Approval needed: ok", "Approval escalated to support-leads: ok"]
    assert fields_of(receiver.bodies[1])["Group"] == "support-leads"
    await engine.cancel(run_id)


async def test_an_outbox_row_survives_a_restart_and_is_delivered_once(
    store_url: str, receiver: Receiver
) -> None:
    note = Notification("run_failed", "default", "Run failed: x", "disk full", subject_id="run_r", key="k1")
    store = await open_store(store_url)
    first = Notifier([WebhookChannel(receiver.url)], base_url=BASE, store=store, poll_interval=0.05)
    await first.notify(note)  # the sender never started: the process "dies" before delivery
    await first.aclose()
    await store.close()
    assert receiver.attempts == 0

    store = await open_store(store_url)
    try:
        again = Notifier([WebhookChannel(receiver.url)], base_url=BASE, store=store, poll_interval=0.05)
        assert again.outbox is not None
        assert await again.outbox.enqueue(note) == 0  # the same event again is a no-op
        again.start()
        await again.flush(10)
        await again.flush(1)
        (row,) = await again.outbox.rows()
        await again.aclose()
    finally:
        await store.close()
    assert receiver.attempts == 1
    assert [b["blocks"][0]["text"]["text"] for b in receiver.bodies] == ["Run failed: x"]
    assert (row.status, row.attempts, row.last_error) == ("sent", 1, None)
    assert row.sent_at is not None
    assert "secret-token-xyz" not in json.dumps(row.message.to_dict())


async def test_a_failing_receiver_is_retried_then_recorded_failed(
    store_url: str, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    receiver.fail_first = 99
    store = await open_store(store_url)
    try:
        notifier = Notifier(
            [WebhookChannel(receiver.url)],
            base_url=BASE,
            store=store,
            attempts=3,
            backoff=0.02,
            poll_interval=0.05,
        )
        notifier.start()
        await notifier.notify(Notification("run_failed", "acme", "Run failed: y", "t", subject_id="run_y"))
        await notifier.flush(10)
        assert notifier.outbox is not None
        (row,) = await notifier.outbox.rows()
        assert receiver.attempts == 3
        assert (row.status, row.attempts, row.tenant) == ("failed", 3, "acme")
        assert row.last_error == "webhook:127.0.0.1 answered HTTP 503"
        assert notifier.failed == [("webhook:127.0.0.1", "run_failed", "run_y")]

        receiver.attempts, receiver.fail_status = 0, 400  # not worth retrying
        await notifier.notify(Notification("run_failed", "acme", "Run failed: z", "t", subject_id="run_z"))
        await notifier.flush(10)
        rows = await notifier.outbox.rows(subject_id="run_z")
        await notifier.aclose()
    finally:
        await store.close()
    assert receiver.attempts == 1
    assert [(r.status, r.attempts) for r in rows] == [("failed", 1)]
    assert receiver.bodies == []
    assert "secret-token-xyz" not in caplog.text
    assert "HTTP 503" in caplog.text


async def test_the_store_being_away_falls_back_to_memory(store_url: str, receiver: Receiver) -> None:
    store = await open_store(store_url)
    notifier = Notifier([WebhookChannel(receiver.url)], base_url=BASE, store=store, poll_interval=0.05)
    await store.close()  # every outbox write now fails
    await notifier.notify(Notification("run_failed", "default", "Run failed: m", "t", subject_id="run_m"))
    assert notifier._tasks  # sent from memory instead
    await notifier.aclose()
    assert [b["blocks"][0]["text"]["text"] for b in receiver.bodies] == ["Run failed: m"]


@pytest.mark.slow
async def test_tower_worker_notifies_when_configured(tmp_path: Path, receiver: Receiver) -> None:
    db = f"sqlite:///{tmp_path / 'tower.db'}"
    engine = await EmbeddedEngine.open(db)
    try:
        run_id = await engine.start(APPROVAL, {}, execute=False)  # left for a worker
    finally:
        await engine.close()
    env = {
        **os.environ,
        "TOWER_DB_URL": db,
        "TOWER_HOME": str(tmp_path),
        "TOWER_NOTIFY_WEBHOOK_URL": receiver.url,
        "TOWER_BASE_URL": BASE,
        "NO_COLOR": "1",
    }
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "controltower.cli.main", "worker", "--once"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "secret-token-xyz" not in proc.stderr + proc.stdout
    assert len(receiver.bodies) == 1
    assert f"{BASE}/ui/runs/{run_id}" in receiver.bodies[0]["text"]
    assert receiver.bodies[0]["blocks"][0]["text"]["text"] == "Approval needed: Finance sign-off"


@pytest.mark.slow
async def test_tower_run_notifies_the_approval_it_parks_on(tmp_path: Path, receiver: Receiver) -> None:
    """Every command notifies, not only the server: `tower run` parks on an approval step."""
    spec_file = tmp_path / "approval.json"
    spec_file.write_text(APPROVAL.model_dump_json(exclude_none=True))
    env = {
        **os.environ,
        "TOWER_DB_URL": f"sqlite:///{tmp_path / 'tower.db'}",
        "TOWER_HOME": str(tmp_path),
        "TOWER_NOTIFY_WEBHOOK_URL": receiver.url,
        "TOWER_BASE_URL": BASE,
        "NO_COLOR": "1",
    }
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "controltower.cli.main", "run", str(spec_file)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "waiting" in proc.stdout
    assert len(receiver.bodies) == 1
    assert receiver.bodies[0]["blocks"][0]["text"]["text"] == "Approval needed: Finance sign-off"


async def test_an_approval_left_unannounced_by_a_crash_is_announced_at_the_next_start(
    engine: EmbeddedEngine, receiver: Receiver
) -> None:
    """The request commits before its notification is enqueued: a process that died in
    between left a pending approval nobody heard of; the next notifier to start announces it
    once (the outbox ignores what it already holds)."""
    from tests.notify.test_notify import POLICY, REFUND, ask, refund

    from controltower.gateway.pipeline import open_gateway

    gateway = await open_gateway(engine.store, policy_texts=POLICY)  # no notifier: "crashed"
    await gateway.registry.register(REFUND, refund)
    pending = await gateway.call(ask())
    assert pending.status == "pending_approval"
    assert receiver.bodies == []

    for _ in range(2):  # two restarts: announced once
        notifier = Notifier(
            [WebhookChannel(receiver.url)], base_url=BASE, store=engine.store, poll_interval=0.05
        )
        notifier.attach(engine=engine, gateway=gateway)
        notifier.start()
        await notifier.flush(10)
        await notifier.aclose()
    assert [b["blocks"][0]["text"]["text"] for b in receiver.bodies] == ["Approval needed: payments.refund"]
    assert f"{BASE}/ui/approvals/{pending.approval_id}" in receiver.bodies[0]["text"]


async def test_an_approval_step_left_unannounced_is_announced_once_at_the_next_start(
    engine: EmbeddedEngine, receiver: Receiver
) -> None:
    """A run parked on an approval step while no notifier ran (or one that died before it
    enqueued) is announced by the next notifier that starts, once, as the hook would have."""
    before = time.time()
    quiet = await engine.start(APPROVAL, {})  # nobody listening
    await engine.wait(quiet, statuses=("waiting",), timeout=10)
    for _ in range(2):  # two restarts: announced once
        notifier = Notifier(
            [WebhookChannel(receiver.url)], base_url=BASE, store=engine.store, poll_interval=0.05
        )
        notifier.attach(engine=engine)
        notifier.start()
        await notifier.flush(10)
        await notifier.aclose()
    assert len(receiver.bodies) == 1
    body = receiver.bodies[0]
    assert body["blocks"][0]["text"]["text"] == "Approval needed: Finance sign-off"
    assert f"{BASE}/ui/runs/{quiet}" in body["text"]
    fields = fields_of(body)
    assert (fields["Group"], fields["Step"]) == ("finance", "sign_off")
    assert fields["Due"] in {
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(before + d)) for d in (3600, 3660)
    }

    # a run announced by the hook is not announced again by a later start
    notifier = Notifier([WebhookChannel(receiver.url)], base_url=BASE, store=engine.store, poll_interval=0.05)
    notifier.attach(engine=engine)
    notifier.start()
    heard = await engine.start(APPROVAL, {})
    await engine.wait(heard, statuses=("waiting",), timeout=10)
    await notifier.flush(10)
    await notifier.aclose()
    assert notifier.outbox is not None
    assert await notifier.catch_up() == 0
    assert len(receiver.bodies) == 2
