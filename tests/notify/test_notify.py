"""Notifications to a real HTTP receiver and a real SMTP server: approvals, escalations, run failures."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from tests.notify.conftest import Mailbox, Receiver

from controltower.engine import EmbeddedEngine
from controltower.gateway.pipeline import ApprovalSettings, ToolCallRequest, open_gateway
from controltower.gateway.tools import ExecContext, ToolDefinition
from controltower.notify import EmailChannel, Notifier, WebhookChannel
from controltower.spec.errors import InvalidInputError
from controltower.spec.models import WorkflowSpec
from controltower.store import SqlStore

BASE = "https://tower.example.com"
POLICY = {
    "refunds.cedar": """
@id("refunds-need-finance")
@approval("finance")
permit (principal in Workflow::"support", action == Action::"payments.refund", resource);
"""
}


async def refund(args: dict[str, Any], ctx: ExecContext) -> dict[str, Any]:
    return {"refunded": args["amount_cents"]}


REFUND = ToolDefinition(
    name="payments.refund",
    owner="finance",
    side_effect="irreversible",
    risk="high",
    input_schema={"type": "object", "properties": {"amount_cents": {"type": "integer"}}},
)


def ask(**over: Any) -> ToolCallRequest:
    fields: dict[str, Any] = {
        "workflow": "support",
        "run_id": "run_1",
        "step_key": "s",
        "autonomy": "expanded",
    }
    fields.update(over)
    return ToolCallRequest(tool="payments.refund", args={"amount_cents": 4_500}, **fields)


async def test_approval_requests_and_escalations_reach_chat_and_email(
    store: SqlStore, receiver: Receiver, mailbox: Mailbox
) -> None:
    notifier = Notifier(
        [
            WebhookChannel(receiver.url),
            EmailChannel(mailbox.host, "tower@example.com", ["finance@example.com"], port=mailbox.port),
        ],
        base_url=BASE,
    )
    gateway = await open_gateway(store, policy_texts=POLICY)
    earlier: list[str] = []

    async def listener(event: str, appr: Any) -> None:
        earlier.append(event)

    gateway.notifier = listener  # someone listened before: they keep hearing
    notifier.attach(gateway=gateway)
    notifier.attach(gateway=gateway)  # attaching twice changes nothing
    await gateway.registry.register(REFUND, refund)
    settings = ApprovalSettings(sla=0.0001, on_timeout="escalate", escalate_to="cfo-office")
    pending = await gateway.call(ask(approval=settings))
    assert pending.status == "pending_approval"
    await asyncio.sleep(0.01)  # past the SLA
    assert (await gateway.call(ask(approval=settings))).status == "pending_approval"
    await notifier.flush(10)
    await notifier.aclose()

    assert earlier == ["requested", "escalated"]
    link = f"{BASE}/ui/approvals/{pending.approval_id}"
    assert [b["blocks"][0]["text"]["text"] for b in receiver.bodies] == [
        "Approval needed: payments.refund",
        "Approval escalated to cfo-office: payments.refund",
    ]
    first = receiver.bodies[0]
    assert link in first["text"]
    assert first["blocks"][-1]["elements"][0]["url"] == link
    fields = {f["text"].split("\n")[0]: f["text"].split("\n")[1] for f in first["blocks"][2]["fields"]}
    assert fields["*Risk*"] == "high"
    assert fields["*Group*"] == "finance"
    assert "4500" not in str(receiver.bodies)  # no arguments in chat
    subjects = [m["Subject"] for m in mailbox.messages]
    assert subjects == [
        "[Control Tower] Approval needed: payments.refund",
        "[Control Tower] Approval escalated to cfo-office: payments.refund",
    ]
    text = mailbox.messages[0].get_payload(decode=True)
    assert isinstance(text, bytes)
    assert link in text.decode()
    assert mailbox.envelopes[0] == ("tower@example.com", ["finance@example.com"])


async def test_a_failed_run_is_reported_with_a_link_and_the_run_is_unaffected(
    engine: EmbeddedEngine, receiver: Receiver
) -> None:
    notifier = Notifier([WebhookChannel(receiver.url)], base_url=BASE)
    notifier.attach(engine=engine)
    spec = WorkflowSpec.model_validate(
        {
            "name": "breaks",
            "tools": {"fail": {"impl": "builtin:fail"}, "echo": {"impl": "builtin:echo"}},
            "steps": [{"id": "boom", "kind": "tool", "tool": "fail", "input": {"message": "disk full"}}],
        }
    )
    ok = WorkflowSpec.model_validate(
        {
            "name": "fine",
            "tools": {"echo": {"impl": "builtin:echo"}},
            "steps": [{"id": "e", "kind": "tool", "tool": "echo"}],
        }
    )
    run_id = await engine.start(spec, {})
    run = await engine.wait(run_id, timeout=10)
    assert run.status == "failed"
    assert (await engine.wait(await engine.start(ok, {}), timeout=10)).status == "completed"
    await notifier.flush(10)
    await notifier.aclose()
    assert len(receiver.bodies) == 1
    body = receiver.bodies[0]
    assert body["blocks"][0]["text"]["text"] == "Run failed: breaks"
    assert f"{BASE}/ui/runs/{run_id}" in body["text"]
    assert "boom" in body["blocks"][1]["text"]["text"]


async def test_deliveries_are_retried_with_backoff_then_given_up_without_leaking_the_url(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    receiver.fail_first = 2
    notifier = Notifier([WebhookChannel(receiver.url)], base_url=BASE, attempts=4, backoff=0.01)
    from controltower.notify.messages import Notification

    notifier.send(Notification("run_failed", "default", "Run failed: x", "text", subject_id="run_a"))
    await notifier.flush(10)
    assert receiver.attempts == 3
    assert len(receiver.bodies) == 1
    assert notifier.delivered == [("webhook:127.0.0.1", "run_failed", "run_a")]

    receiver.fail_first, receiver.attempts, receiver.fail_status = 99, 0, 400
    notifier.send(Notification("run_failed", "default", "Run failed: y", "text", subject_id="run_b"))
    await notifier.flush(10)
    assert receiver.attempts == 1  # a 400 is not retried
    assert notifier.failed == [("webhook:127.0.0.1", "run_failed", "run_b")]
    await notifier.aclose()
    assert "secret-token-xyz" not in caplog.text
    assert "HTTP 503" in caplog.text


async def test_an_unreachable_smtp_server_never_breaks_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    from tests.triggers.helpers import free_port

    channel = EmailChannel(
        "127.0.0.1", "t@example.com", ["a@example.com"], port=free_port(), password="hunter2-smtp"
    )
    notifier = Notifier([channel], attempts=2, backoff=0.01)
    from controltower.notify.messages import Notification

    notifier.send(Notification("run_failed", "default", "t", "x", subject_id="run_c"))
    await notifier.flush(10)
    assert notifier.failed == [(channel.name, "run_failed", "run_c")]
    assert "hunter2-smtp" not in caplog.text
    assert "hunter2-smtp" not in repr(channel)


def test_settings_come_from_the_environment() -> None:
    assert Notifier.from_env(env={}) is None
    notifier = Notifier.from_env(
        env={
            "TOWER_NOTIFY_WEBHOOK_URL": "https://hooks.slack.com/services/T/B/x",
            "TOWER_SMTP_HOST": "mail.example.com",
            "TOWER_SMTP_PORT": "587",
            "TOWER_NOTIFY_EMAIL_TO": "a@example.com, b@example.com",
            "TOWER_NOTIFY_EVENTS": "run_failed",
            "TOWER_BASE_URL": "https://tower.example.com/",
        }
    )
    assert notifier is not None
    assert [c.name for c in notifier.channels] == ["webhook:hooks.slack.com", "smtp:mail.example.com:587"]
    email = notifier.channels[1]
    assert isinstance(email, EmailChannel)
    assert email.security == "starttls"
    assert email.recipients == ["a@example.com", "b@example.com"]
    assert notifier.events == {"run_failed"}
    assert notifier.base_url == "https://tower.example.com"
    with pytest.raises(InvalidInputError, match="unknown notification event"):
        Notifier.from_env(
            env={"TOWER_NOTIFY_WEBHOOK_URL": "https://x.example", "TOWER_NOTIFY_EVENTS": "typo"}
        )
    with pytest.raises(InvalidInputError, match="notification settings"):
        Notifier.from_env(env={"TOWER_NOTIFY_WEBHOOK_URL": "ftp://nope"})
