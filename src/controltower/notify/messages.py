"""What a notification says, rendered for chat (Slack-compatible) and for email.

A notification carries no arguments and no payloads: only what is needed to recognise the
event (workflow, tool, risk, group, run) and a link into the dashboard where an authorised
person sees the rest. Approval arguments are redacted by the gateway anyway; this keeps even
redacted business data out of chat channels and mailboxes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

from controltower.engine.interpreter import StepApproval
from controltower.gateway.approvals import ApprovalRequest
from controltower.store import RunRecord

EVENTS = ("approval_requested", "approval_escalated", "approval_expired", "approval_decided", "run_failed")
MAX_TEXT = 500


@dataclass(frozen=True, slots=True)
class Notification:
    event: str
    tenant: str
    title: str
    text: str
    link: str | None = None
    fields: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    subject_id: str = ""  # the approval or run the notification is about
    key: str = ""  # one event, one key: the outbox ignores a second enqueue of the same key

    @property
    def dedupe_key(self) -> str:
        return self.key or f"{self.event}:{self.subject_id}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "tenant": self.tenant,
            "title": self.title,
            "text": self.text,
            "link": self.link,
            "fields": [list(f) for f in self.fields],
            "subject_id": self.subject_id,
            "key": self.key,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Notification:
        return cls(
            event=str(data["event"]),
            tenant=str(data["tenant"]),
            title=str(data["title"]),
            text=str(data["text"]),
            link=data.get("link"),
            fields=tuple((str(k), str(v)) for k, v in data.get("fields") or ()),
            subject_id=str(data.get("subject_id") or ""),
            key=str(data.get("key") or ""),
        )

    def slack(self) -> dict[str, Any]:
        """A Slack incoming-webhook payload: ``text`` (fallback) and Block Kit ``blocks``."""
        fallback = _mrkdwn(f"{self.title}: {self.text}")
        if self.link:
            fallback += f" <{self.link}|Open in Control Tower>"
        blocks: list[dict[str, Any]] = [
            {"type": "header", "text": {"type": "plain_text", "text": self.title[:150]}},
            {"type": "section", "text": {"type": "mrkdwn", "text": _mrkdwn(self.text)}},
        ]
        if self.fields:
            blocks.append(
                {
                    "type": "section",
                    "fields": [
                        {"type": "mrkdwn", "text": f"*{_mrkdwn(k)}*\n{_mrkdwn(v)}"}
                        for k, v in self.fields[:10]
                    ],
                }
            )
        if self.link:
            blocks.append(
                {
                    "type": "actions",
                    "elements": [
                        {
                            "type": "button",
                            "text": {"type": "plain_text", "text": "Open in Control Tower"},
                            "url": self.link,
                            "action_id": f"open_{self.event}",
                        }
                    ],
                }
            )
        return {"text": fallback, "blocks": blocks}

    def email(self, sender: str, recipients: list[str]) -> EmailMessage:
        msg = EmailMessage()
        msg["Subject"] = f"[Control Tower] {self.title}"
        msg["From"] = sender
        msg["To"] = ", ".join(recipients)
        lines = [self.text, ""]
        lines += [f"{k}: {v}" for k, v in self.fields]
        if self.link:
            lines += ["", f"Open in Control Tower: {self.link}"]
        msg.set_content("\n".join(lines) + "\n")
        return msg


def _mrkdwn(text: str) -> str:
    """Escape Slack's control characters (``&``, ``<``, ``>``) so user text cannot forge links."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def approval_notification(event: str, appr: ApprovalRequest, base_url: str) -> Notification:
    """A gateway approval event (``requested``, ``escalated``, ``expired``, ``decided``)."""
    who = appr.agent or appr.workflow or "a workflow"
    group = appr.approval_group or "any approver"
    titles = {
        "requested": f"Approval needed: {appr.tool}",
        "escalated": f"Approval escalated to {group}: {appr.tool}",
        "expired": f"Approval expired: {appr.tool}",
        "decided": f"Approval {appr.status}: {appr.tool}",
    }
    texts = {
        "requested": f"{who} wants to call {appr.tool} ({appr.risk} risk); {group} may decide.",
        "escalated": f"No decision within the SLA; {group} may now decide on {appr.tool} for {who}.",
        "expired": f"Nobody decided on {appr.tool} for {who} within the SLA; the action did not run.",
        "decided": f"{appr.decided_by or 'someone'} {appr.status} {appr.tool} for {who}.",
    }
    fields = [
        ("Workflow", appr.workflow or "-"),
        ("Tool", f"{appr.tool} v{appr.tool_version}"),
        ("Risk", appr.risk),
        ("Group", group),
        ("Run", appr.run_id or "-"),
        ("Due", _when(appr.due_at)),
    ]
    return Notification(
        event=f"approval_{event}",
        tenant=appr.tenant,
        title=titles.get(event, f"Approval {event}: {appr.tool}"),
        text=_clip(texts.get(event, f"approval {appr.id} is {appr.status}")),
        link=f"{base_url.rstrip('/')}/ui/approvals/{appr.id}",
        fields=tuple(fields),
        subject_id=appr.id,
        key=f"approval_{event}:{appr.id}",
    )


def step_approval_notification(run: RunRecord, appr: StepApproval, base_url: str) -> Notification:
    """An approval step of a workflow is waiting (``requested``) or was escalated (``escalated``)."""
    group = appr.group or "any operator"
    if appr.event == "escalated":
        title = f"Approval escalated to {group}: {appr.title}"
        text = f"No decision within the SLA; {group} may now decide on {appr.title!r} in run {run.id}."
    else:
        title = f"Approval needed: {appr.title}"
        text = f"Run {run.id} of {run.workflow} waits at {appr.title!r}: {appr.prompt} ({group} may decide)."
    fields = [
        ("Workflow", f"{run.workflow} v{run.version}"),
        ("Step", appr.step_key),
        ("Group", group),
        ("Run", run.id),
        ("Due", _when(appr.due_at)),
    ]
    return Notification(
        event=f"approval_{appr.event}",
        tenant=run.tenant,
        title=_clip(title, 150),
        text=_clip(text),
        link=f"{base_url.rstrip('/')}/ui/runs/{run.id}",
        fields=tuple(fields),
        subject_id=f"{run.id}/{appr.step_key}",
        key=f"step_approval_{appr.event}:{run.id}:{appr.step_key}:{appr.requested_at:.6f}",
    )


def run_failed_notification(run: RunRecord, base_url: str) -> Notification:
    error = run.error or {}
    reason = str(error.get("message") or error.get("code") or "unknown error")
    step = error.get("step")
    fields = [
        ("Workflow", f"{run.workflow} v{run.version}"),
        ("Run", run.id),
        ("Code", str(error.get("code", "-"))),
    ]
    if step:
        fields.append(("Step", str(step)))
    return Notification(
        event="run_failed",
        tenant=run.tenant,
        title=f"Run failed: {run.workflow}",
        text=_clip(
            f"Run {run.id} of {run.workflow} failed" + (f" at {step}" if step else "") + f": {reason}"
        ),
        link=f"{base_url.rstrip('/')}/ui/runs/{run.id}",
        fields=tuple(fields),
        subject_id=run.id,
        key=f"run_failed:{run.id}:{run.finished_at or run.updated_at:.6f}",
    )
