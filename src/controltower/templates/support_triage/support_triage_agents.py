"""Offline agents and sandbox tools for the support-triage template.

The drafter and reviewer are deterministic heuristics so the workflow runs with no
model configured; swap them for LLM agents without touching the workflow's shape.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

KNOWLEDGE_BASE: dict[str, dict[str, str]] = {
    "billing": {
        "id": "KB-101",
        "title": "Refunds and duplicate charges",
        "answer": "Duplicate charges are refunded automatically within 5 business days; "
        "you can see the pending refund under Billing > History.",
    },
    "account": {
        "id": "KB-204",
        "title": "Resetting your password",
        "answer": "Use 'Forgot password' on the sign-in page; the link is valid for 30 minutes. "
        "If single sign-on is enabled, reset it with your identity provider.",
    },
    "how-to": {
        "id": "KB-318",
        "title": "Exporting data",
        "answer": "Go to Reports > Export and pick CSV or JSON; exports over 1 GB arrive by e-mail.",
    },
    "other": {
        "id": "KB-000",
        "title": "Getting help",
        "answer": "Our team will look into this and reply within one business day.",
    },
}

BANNED = ("unfortunately", "obviously", "just", "simply")


def kb_search(payload: dict[str, Any]) -> dict[str, str]:
    return KNOWLEDGE_BASE.get(str(payload.get("category")), KNOWLEDGE_BASE["other"])


def draft_reply(payload: dict[str, Any]) -> dict[str, Any]:
    """First drafts are a little sloppy on purpose, so the quality loop has work to do."""
    article = payload.get("article") or {}
    customer = payload.get("customer") or "there"
    attempt = int(payload.get("attempt") or 1)
    feedback = (payload.get("feedback") or {}).get("problems", [])
    opener = f"Hi {customer}, thanks for reaching out."
    body = article.get("answer", "")
    if attempt == 1 and len(customer) % 2 == 0:
        body = "Unfortunately " + body[0].lower() + body[1:]
    text = f"{opener} {body}"
    if attempt > 1 or not feedback:
        text += f" (See {article.get('id', 'our help centre')}: {article.get('title', '')}.)"
    text += " Best regards, the Support team"
    return {"text": text, "attempt": attempt}


def review_reply(payload: dict[str, Any]) -> dict[str, Any]:
    draft = (payload.get("draft") or {}).get("text", "")
    article = payload.get("article") or {}
    problems = []
    lowered = draft.lower()
    if any(word in lowered.split() or lowered.startswith(word) for word in BANNED):
        problems.append("tone: avoid 'unfortunately', 'just', 'simply', 'obviously'")
    if article.get("id") and article["id"] not in draft:
        problems.append(f"accuracy: cite the article {article['id']}")
    if article.get("id") == "KB-000":
        problems.append("coverage: no specific article; a human should answer")
    score = round(max(0.0, 1.0 - 0.4 * len(problems)), 2)
    return {"passed": not problems, "score": score, "problems": problems}


def _outbox() -> Path:
    root = Path(os.environ.get("TOWER_HOME", ".tower"))
    root.mkdir(parents=True, exist_ok=True)
    return root / "support-outbox.jsonl"


def send_reply(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Append to the sandbox outbox, de-duplicated by the step's idempotency key."""
    path = _outbox()
    key = ctx.idempotency_key
    if path.exists() and any(json.loads(line).get("key") == key for line in path.read_text().splitlines()):
        return {"sent": True, "duplicate": True, "key": key}
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"key": key, **payload}) + "\n")
    return {"sent": True, "duplicate": False, "key": key}


def escalate(payload: dict[str, Any]) -> dict[str, Any]:
    queue = "security" if payload.get("category") == "security" else "tier-two"
    return {
        "queue": queue,
        "ticket": payload.get("ticket"),
        "priority": "high" if queue == "security" else "normal",
    }
