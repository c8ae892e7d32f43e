"""Offline agents and sandbox tools for the IT service desk template.

The sandbox is a small ticketing system (SQLite under ``$TOWER_HOME/sandbox/itsm.sqlite``)
seeded from ``data/`` on first use: users (with VIPs), assets with warranty dates, open tickets,
and a knowledge base of known fixes. The workflow writes ticket updates and resolutions to it.

Triage and next-best-action are deterministic heuristics (keyword scoring against the knowledge
base, impact/urgency rules, duplicate and major-incident detection over the open tickets), so the
workflow runs with no model configured; the output says ``"mode": "offline-heuristic"``.
"""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

from controltower.sandbox import SandboxDB, insert_rows, load_json

DATA = Path(__file__).resolve().parent / "data"
MODE = "offline-heuristic"

# The knowledge base (data/knowledge_base.json): one topic per known problem. ``any``: keywords
# (word stems; a subject hit counts double); ``all``: words that must also appear; ``request``: a
# service request (P4); ``auto``: the fix is safe to apply without an engineer; ``shared``: a shared
# service, where several reports within the hour are a major incident.
KNOWLEDGE_BASE: list[dict[str, Any]] = json.loads((DATA / "knowledge_base.json").read_text(encoding="utf-8"))
COMPROMISE = ("entered my password", "ransom", "encrypted", "strange extension", "hacked")
SOCIAL_ENGINEERING = (
    "personal gmail",
    "personal email",
    "personal address",
    "gift card",
    "wire transfer",
    "send the new one",
    "send me the password",
)
OUTAGE = ("down", "nobody", "anyone", "whole team", "outage", "everyone", "all users")
BLOCKING = ("won't turn on", "can't work", "cannot work", "not working", "dead", "down")
AUTO_MIN_CONFIDENCE = 0.7

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    email TEXT PRIMARY KEY, name TEXT, department TEXT, vip INTEGER, title TEXT);
CREATE TABLE IF NOT EXISTS assets (
    asset_id TEXT PRIMARY KEY, owner_email TEXT, type TEXT, model TEXT, warranty_until TEXT);
CREATE TABLE IF NOT EXISTS tickets (
    ticket_id TEXT PRIMARY KEY, requester TEXT, subject TEXT, body TEXT, created_at TEXT, status TEXT,
    category TEXT, priority TEXT, assignment_group TEXT, resolution TEXT);
CREATE TABLE IF NOT EXISTS kb (kb_id TEXT PRIMARY KEY, data TEXT);
CREATE TABLE IF NOT EXISTS work_notes (key TEXT PRIMARY KEY, ticket_id TEXT, note TEXT, fields TEXT);
"""


def _seed(conn: sqlite3.Connection) -> None:
    for table in ("users", "assets", "tickets"):
        insert_rows(conn, table, load_json(DATA / f"{table}.json"))
    insert_rows(conn, "kb", [{"kb_id": kb["id"], "data": json.dumps(kb)} for kb in KNOWLEDGE_BASE])


SANDBOX = SandboxDB("itsm", _SCHEMA, _seed)


# --- tools ------------------------------------------------------------------------------


def get_ticket(payload: dict[str, Any]) -> dict[str, Any]:
    """The ticket, its requester and laptop, and related tickets: the requester's own of the last
    day (duplicates) and everyone's within the hour (major incidents)."""
    ticket_id = str(payload.get("ticket_id") or "")
    with SANDBOX.session() as conn:
        row = conn.execute("SELECT * FROM tickets WHERE ticket_id = ?", (ticket_id,)).fetchone()
        if row is None:
            return {"found": False, "ticket_id": ticket_id}
        ticket = dict(row)
        user = conn.execute("SELECT * FROM users WHERE email = ?", (ticket["requester"],)).fetchone()
        asset = conn.execute("SELECT * FROM assets WHERE owner_email = ?", (ticket["requester"],)).fetchone()
        recent = [
            dict(r)
            for r in conn.execute(
                "SELECT ticket_id, requester, subject, body, created_at, status FROM tickets "
                "WHERE ticket_id != ? "
                "AND ((requester = ? AND abs(julianday(created_at) - julianday(?)) <= 1.0) "
                "OR abs(julianday(created_at) - julianday(?)) <= 1.0 / 24)",
                (ticket_id, ticket["requester"], ticket["created_at"], ticket["created_at"]),
            )
        ]
    return {
        "found": True,
        "ticket": ticket,
        "requester": dict(user) if user else None,
        "asset": dict(asset) if asset else None,
        "recent": recent,
    }


def kb_search(payload: dict[str, Any]) -> dict[str, Any]:
    """The knowledge-base article for a topic id."""
    with SANDBOX.session() as conn:
        row = conn.execute("SELECT data FROM kb WHERE kb_id = ?", (payload.get("kb_id"),)).fetchone()
    return json.loads(row["data"]) if row else {}


def update_ticket(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Set category, priority and assignment group, and add the agent's work note."""
    fields = {k: payload.get(k) for k in ("category", "priority", "assignment_group")}
    with SANDBOX.session() as conn:
        conn.execute(
            "UPDATE tickets SET category = ?, priority = ?, assignment_group = ?, status = 'assigned' "
            "WHERE ticket_id = ?",
            (fields["category"], fields["priority"], fields["assignment_group"], payload["ticket_id"]),
        )
        conn.execute(
            "INSERT OR IGNORE INTO work_notes VALUES (?, ?, ?, ?)",
            (ctx.idempotency_key, payload["ticket_id"], payload.get("work_note", ""), json.dumps(fields)),
        )
    return {"ticket_id": payload["ticket_id"], "updated": fields}


def resolve_ticket(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Apply the fix and resolve the ticket (or close it as a duplicate)."""
    status = "closed" if payload.get("duplicate_of") else "resolved"
    with SANDBOX.session() as conn:
        conn.execute(
            "UPDATE tickets SET status = ?, resolution = ? WHERE ticket_id = ?",
            (status, payload["resolution"], payload["ticket_id"]),
        )
        conn.execute(
            "INSERT OR IGNORE INTO work_notes VALUES (?, ?, ?, ?)",
            (
                ctx.idempotency_key,
                payload["ticket_id"],
                payload["resolution"],
                json.dumps({"status": status}),
            ),
        )
    return {"ticket_id": payload["ticket_id"], "status": status}


# --- agents -----------------------------------------------------------------------------


def _hits(keywords: list[str], text: str) -> int:
    return sum(1 for kw in keywords if re.search(rf"\b{re.escape(kw)}(?:s|es|ed|ing)?\b", text))


def _score(kb: dict[str, Any], subject: str, body: str) -> int:
    text = f"{subject} {body}"
    if any(not re.search(rf"\b{re.escape(w)}", text) for w in kb.get("all", [])):
        return 0
    return 2 * _hits(kb["any"], subject) + _hits(kb["any"], body)


def _when(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def _topic(subject: str, body: str) -> tuple[dict[str, Any] | None, int, int]:
    ranked = sorted(((_score(kb, subject, body), i) for i, kb in enumerate(KNOWLEDGE_BASE)), reverse=True)
    (best, i), (second, _) = ranked[0], ranked[1]
    return (KNOWLEDGE_BASE[i] if best else None), best, second


def triage(payload: dict[str, Any]) -> dict[str, Any]:
    """Category, priority (impact x urgency), assignment group, confidence, and warning signals."""
    record = payload.get("record") or {}
    if not record.get("found"):
        return {"found": False, "category": None, "priority": None, "assignment_group": None, "mode": MODE}
    ticket = record["ticket"]
    subject, body = str(ticket.get("subject") or "").lower(), str(ticket.get("body") or "").lower()
    text = f"{subject} {body}"
    kb, best, second = _topic(subject, body)
    signals: list[str] = []
    if not text.strip():
        signals.append("empty_ticket")
    requester = record.get("requester")
    if requester is None:
        signals.append("unknown_requester")
    if any(p in text for p in SOCIAL_ENGINEERING):
        signals.append("social_engineering")
    security = next(k for k in KNOWLEDGE_BASE if k["category"] == "security")
    if "social_engineering" in signals or _score(security, subject, body):
        kb, best, second = security, max(best, 2), 0
    confidence = 0.1 if not text.strip() else 0.3
    if kb is not None:
        confidence = round(0.5 + 0.45 * (best - second) / best, 2)
    # the same person, the same topic, an earlier ticket of the last day: a duplicate
    duplicate_of = None
    major_incident = False
    created = _when(ticket.get("created_at"))
    if kb is not None and created is not None:
        earlier = []
        same_topic_hour = 0
        for other in record.get("recent") or []:
            o_subject, o_body = str(other.get("subject") or "").lower(), str(other.get("body") or "").lower()
            o_kb, _, _ = _topic(o_subject, o_body)
            o_created = _when(other.get("created_at"))
            if o_kb is None or o_kb["id"] != kb["id"] or o_created is None:
                continue
            if other.get("requester") == ticket.get("requester") and o_created < created:
                earlier.append((o_created, other["ticket_id"]))
            if abs((o_created - created).total_seconds()) <= 3600:
                same_topic_hour += 1
        if earlier:
            duplicate_of = min(earlier)[1]
            signals.append("duplicate")
        if kb.get("shared") and same_topic_hour >= 2 and any(w in text for w in OUTAGE):
            major_incident = True
            signals.append("major_incident")
    category = kb["category"] if kb else "other"
    vip = bool(requester and requester.get("vip"))
    if major_incident or (category == "security" and any(w in text for w in COMPROMISE)):
        priority = "P1"
    elif category == "security" or (vip and (category == "hardware" or any(w in text for w in BLOCKING))):
        priority = "P2"
    elif kb is not None and kb.get("request"):
        priority = "P4"
    else:
        priority = "P3"
    return {
        "found": True,
        "category": category,
        "topic": kb["id"] if kb else None,
        "priority": priority,
        "assignment_group": kb["group"] if kb else "service-desk",
        "confidence": confidence,
        "vip": vip,
        "duplicate_of": duplicate_of,
        "major_incident": major_incident,
        "signals": signals,
        "mode": MODE,
    }


async def next_best_action(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Look the topic up in the knowledge base and draft what to do, and whether it is safe to do now."""
    record, tri = payload.get("record") or {}, payload.get("triage") or {}
    if not tri.get("found"):
        return {"auto_resolve": False, "action": "nothing to do: the ticket does not exist", "mode": MODE}
    article: dict[str, Any] = {}
    if tri.get("topic"):
        args = {"kb_id": tri["topic"]}
        if getattr(ctx, "gate", None) is None:
            article = kb_search(args)
        else:
            found = await ctx.call_tool(
                "kb_search", args, reasoning="find the known fix for the ticket's topic"
            )
            article = found.get("output") or {}
    ticket, asset = record.get("ticket") or {}, record.get("asset") or {}
    blockers = []
    if not article.get("auto"):
        blockers.append("no safe automatic fix for this topic")
    if tri.get("confidence", 0) < AUTO_MIN_CONFIDENCE:
        blockers.append(f"triage confidence {tri.get('confidence')} is below {AUTO_MIN_CONFIDENCE}")
    if tri.get("priority") in ("P1", "P2"):
        blockers.append(f"{tri.get('priority')} tickets are handled by people")
    for signal in ("unknown_requester", "social_engineering", "major_incident"):
        if signal in tri.get("signals", []):
            blockers.append(signal.replace("_", " "))
    action = article.get("action") or "Call the requester to understand the problem, then re-triage."
    if tri.get("category") == "hardware" and asset.get("warranty_until"):
        under = str(asset["warranty_until"]) >= str(ticket.get("created_at", ""))[:10]
        action += (
            f" {asset['asset_id']} ({asset.get('model')}) is under warranty until {asset['warranty_until']}: "
            "raise a vendor repair."
            if under
            else f" {asset['asset_id']} is out of warranty: replace it from stock."
        )
    if tri.get("major_incident"):
        action = "Link to the open major incident for this service and page the on-call engineer. " + action
    if tri.get("duplicate_of") and tri.get("priority") in ("P3", "P4") and tri.get("category") != "security":
        return {
            "auto_resolve": True,
            "duplicate_of": tri["duplicate_of"],
            "action": f"Close as a duplicate of {tri['duplicate_of']} and add this report to it.",
            "resolution": f"Duplicate of {tri['duplicate_of']}; we are working on it there.",
            "kb": article.get("id"),
            "mode": MODE,
        }
    return {
        "auto_resolve": not blockers,
        "blockers": blockers,
        "duplicate_of": None,
        "action": action,
        "resolution": article.get("reply") or "",
        "kb": article.get("id"),
        "mode": MODE,
    }
