"""Offline agents and sandbox tools for the lead-to-meeting template.

The sandbox "CRM" is a SQLite file at ``$TOWER_HOME/sandbox/crm.sqlite`` (TOWER_HOME defaults to
``.tower``), created and seeded from ``data/`` on first use. The scorer and the drafter are
deterministic heuristics with the same contract as the LLM agents that can replace them.

The rule "never more than one outbound message per lead per window" is enforced three times:
the workflow checks the outbox before drafting, a Cedar policy refuses a send that reports
earlier messages, and ``send_email`` itself refuses (atomically, in the CRM's transaction) to
write a second message to the same address inside the window.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from controltower.sandbox import SandboxDB, insert_rows, load_json

DATA = Path(__file__).resolve().parent / "data"
WINDOW_HOURS = 72
FREE_MAIL = frozenset(
    {"gmail.com", "yahoo.com", "hotmail.com", "outlook.com", "proton.me", "icloud.com", "gmx.de"}
)
DISPOSABLE = frozenset({"mailinator.com", "tempmail.dev", "10minutemail.com", "trashmail.io"})
REGIONS = {
    "emea": {"DE", "FR", "UK", "GB", "NL", "ES", "IT", "SE", "PL", "IE", "AT", "CH", "DK"},
    "amer": {"US", "CA", "BR", "MX", "AR"},
    "apac": {"JP", "AU", "SG", "IN", "NZ", "KR"},
}
TARGET_INDUSTRIES = frozenset({"software", "finance", "retail", "logistics", "healthcare", "manufacturing"})
INTENT = ("demo", "pricing", "quote", "meeting", "trial", "buy", "purchase", "call", "evaluate", "rollout")
NO_INTENT = ("just looking", "just browsing", "no need", "not interested")
FRAUD = ("bank details", "invoice transfer", "wire transfer", "gift card", "confirm the payment")
SPAM = ("seo", "backlink", "casino", "guest post", "crypto", "bitcoin", "viagra", "loan offer")
DISQUALIFY = {
    "student": ("student", "thesis", "homework", "university project"),
    "job_seeker": ("job", "career", "resume", "cv"),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS companies (
  domain TEXT PRIMARY KEY, name TEXT NOT NULL, industry TEXT, employees INTEGER, country TEXT,
  customer INTEGER NOT NULL DEFAULT 0, competitor INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS owners (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL, segment TEXT NOT NULL, region TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS contacts (
  email TEXT PRIMARY KEY, name TEXT, domain TEXT, owner TEXT, status TEXT NOT NULL DEFAULT 'lead');
CREATE TABLE IF NOT EXISTS slots (
  owner TEXT NOT NULL, start TEXT NOT NULL, booked INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (owner, start));
CREATE TABLE IF NOT EXISTS outbox (
  key TEXT PRIMARY KEY, lead_email TEXT NOT NULL, lead_id TEXT, owner TEXT, subject TEXT, text TEXT,
  sent_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS outbox_by_lead ON outbox (lead_email, sent_at);
CREATE TABLE IF NOT EXISTS leads (
  lead_id TEXT PRIMARY KEY, email TEXT, status TEXT NOT NULL, score INTEGER, owner TEXT,
  updated_at REAL NOT NULL);
"""


def _seed(conn: sqlite3.Connection) -> None:
    insert_rows(conn, "companies", load_json(DATA / "companies.json"))
    owners = load_json(DATA / "owners.json")
    insert_rows(conn, "owners", owners)
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    days = [start + timedelta(days=d) for d in range(1, 10) if (start + timedelta(days=d)).weekday() < 5]
    slots = [
        {
            "owner": owner["id"],
            "start": (day + timedelta(hours=hour)).strftime("%Y-%m-%d %H:%M UTC"),
            "booked": 0,
        }
        for owner in owners
        for day in days[:4]
        for hour in owner["hours"]
    ]
    insert_rows(conn, "slots", slots)
    contacts = load_json(DATA / "contacts.json")
    insert_rows(conn, "contacts", [{**c, "domain": c["email"].split("@")[-1]} for c in contacts])
    now = time.time()
    earlier = [
        {
            "key": f"seed:{c['email']}",
            "lead_email": c["email"],
            "owner": c.get("owner"),
            "subject": "earlier message",
            "text": "",
            "sent_at": now - 3600 * float(c["contacted_hours_ago"]),
        }
        for c in contacts
        if c.get("contacted_hours_ago") is not None
    ]
    insert_rows(conn, "outbox", earlier)


SANDBOX = SandboxDB("crm", _SCHEMA, _seed, autocommit=True)


def _domain(email: str) -> str:
    return email.strip().lower().rsplit("@", 1)[-1]


# -- tools (called through the governed gateway) ---------------------------------------------


def crm_enrich(payload: dict[str, Any]) -> dict[str, Any]:
    """Company and contact records for the lead's e-mail domain."""
    email = str(payload["email"]).strip().lower()
    domain = _domain(email)
    with SANDBOX.session() as conn:
        company = conn.execute("SELECT * FROM companies WHERE domain = ?", (domain,)).fetchone()
        contact = conn.execute("SELECT * FROM contacts WHERE email = ?", (email,)).fetchone()
    stated = (payload.get("company") or "").strip()
    found = dict(company) if company is not None else None
    conflict = bool(
        found
        and stated
        and stated.lower() not in found["name"].lower()
        and found["name"].lower() not in stated.lower()
    )
    return {
        "email": email,
        "domain": domain,
        "free_mail": domain in FREE_MAIL,
        "disposable": domain in DISPOSABLE,
        "company": found,
        "company_name": found["name"] if found else (stated or None),
        "company_conflict": conflict,
        "contact": dict(contact) if contact is not None else None,
    }


def outreach_history(payload: dict[str, Any]) -> dict[str, Any]:
    """Messages to this address inside the window, and whether it may be contacted at all."""
    email = str(payload["email"]).strip().lower()
    since = time.time() - WINDOW_HOURS * 3600
    with SANDBOX.session() as conn:
        count, last = conn.execute(
            "SELECT count(*), max(sent_at) FROM outbox WHERE lead_email = ? AND sent_at >= ?", (email, since)
        ).fetchone()
        contact = conn.execute("SELECT status FROM contacts WHERE email = ?", (email,)).fetchone()
    return {
        "messages_in_window": int(count),
        "last_sent_at": last,
        "window_hours": WINDOW_HOURS,
        "do_not_contact": contact is not None and contact["status"] == "do_not_contact",
    }


def assign_owner(payload: dict[str, Any]) -> dict[str, Any]:
    """Existing owner first; else by segment (company size) and region (country)."""
    email = str(payload["email"]).lower()
    with SANDBOX.session() as conn:
        owners = [dict(r) for r in conn.execute("SELECT * FROM owners ORDER BY id")]
        existing = payload.get("existing_owner")
        chosen = next((o for o in owners if o["id"] == existing), None)
        rule = "existing owner"
        if chosen is None:
            employees = int(payload.get("employees") or 0)
            segment = "enterprise" if employees >= 1000 else ("mid" if employees >= 200 else "smb")
            country = str(payload.get("country") or "").upper()
            region = next((r for r, codes in REGIONS.items() if country in codes), None)
            pool = [o for o in owners if o["segment"] == segment and o["region"] in (region, "global")]
            if region == "apac" and segment != "enterprise":
                pool = [o for o in owners if o["region"] == "apac"] or pool
            pool = pool or [o for o in owners if o["segment"] == "smb"]
            pick = int(hashlib.sha256(email.encode()).hexdigest(), 16) % len(pool)
            chosen = pool[pick]
            rule = f"segment {segment}, region {region or 'unknown'}"
        conn.execute(
            "INSERT INTO leads VALUES (?, ?, 'assigned', ?, ?, ?) ON CONFLICT (lead_id) DO UPDATE SET "
            "owner = excluded.owner, score = excluded.score, status = 'assigned', "
            "updated_at = excluded.updated_at",
            (payload["lead_id"], email, payload.get("score"), chosen["id"], time.time()),
        )
    return {"owner": chosen["id"], "name": chosen["name"], "email": chosen["email"], "rule": rule}


def find_slots(payload: dict[str, Any]) -> dict[str, Any]:
    with SANDBOX.session() as conn:
        rows = conn.execute(
            "SELECT start FROM slots WHERE owner = ? AND booked = 0 ORDER BY start LIMIT ?",
            (payload["owner"], int(payload.get("count") or 3)),
        ).fetchall()
    return {"owner": payload["owner"], "slots": [r["start"] for r in rows]}


class OutboundLimitError(Exception):
    """A second message to the same lead inside the window: refused, whoever asked."""

    code = "outbound_limit"


def send_email(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Send (sandbox outbox): at most one message per lead address per window, checked atomically."""
    email = str(payload["to"]).strip().lower()
    key = ctx.idempotency_key
    with SANDBOX.session() as conn:
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute("SELECT 1 FROM outbox WHERE key = ?", (key,)).fetchone() is not None:
            conn.execute("COMMIT")
            return {"sent": True, "duplicate": True, "key": key}
        since = time.time() - WINDOW_HOURS * 3600
        earlier = conn.execute(
            "SELECT count(*) FROM outbox WHERE lead_email = ? AND sent_at >= ?", (email, since)
        ).fetchone()[0]
        if earlier:
            conn.execute("ROLLBACK")
            raise OutboundLimitError(
                f"one outbound message per lead per {WINDOW_HOURS} h: {email} was already contacted"
            )
        conn.execute(
            "INSERT INTO outbox VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                email,
                payload.get("lead_id"),
                payload.get("owner"),
                payload.get("subject"),
                payload["text"],
                time.time(),
            ),
        )
        conn.execute("COMMIT")
    return {"sent": True, "duplicate": False, "key": key}


def update_lead(payload: dict[str, Any]) -> dict[str, Any]:
    with SANDBOX.session() as conn:
        conn.execute(
            "INSERT INTO leads VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (lead_id) DO UPDATE SET "
            "status = excluded.status, score = coalesce(excluded.score, leads.score), "
            "updated_at = excluded.updated_at",
            (
                payload["lead_id"],
                payload.get("email"),
                payload["status"],
                payload.get("score"),
                payload.get("owner"),
                time.time(),
            ),
        )
    return {"lead_id": payload["lead_id"], "status": payload["status"]}


# -- agents (offline heuristics; same contract as the LLM agents) -----------------------------


def _has(text: str, cue: str) -> bool:
    return re.search(r"\b" + re.escape(cue) + r"\b", text) is not None


def score_lead(payload: dict[str, Any]) -> dict[str, Any]:
    """Score 0-100 with reasons; flags that disqualify or mark the lead suspicious."""
    form = payload.get("form") or {}
    enr = payload.get("enrichment") or {}
    company = enr.get("company") or {}
    message = str(form.get("message") or "").lower()
    score, reasons, flags = 10, [], []
    employees = int(company.get("employees") or 0)
    if company:
        size = 40 if employees >= 1000 else 30 if employees >= 200 else 20 if employees >= 10 else 5
        score += size
        reasons.append(f"known company, {employees} employees (+{size})")
        if company.get("industry") in TARGET_INDUSTRIES:
            score += 15
            reasons.append(f"target industry {company['industry']} (+15)")
        if company.get("customer"):
            score += 10
            reasons.append("existing customer: expansion (+10)")
        if company.get("competitor"):
            flags.append("competitor")
    intent = [w for w in INTENT if _has(message, w)]
    if intent:
        score += 25
        reasons.append(f"buying intent: {', '.join(intent)} (+25)")
    if any(_has(message, w) for w in NO_INTENT):
        score -= 20
        reasons.append("no buying intent stated (-20)")
    if any(_has(message, w) for w in FRAUD):
        flags.append("fraud_signal")
    if enr.get("free_mail"):
        score -= 20
        reasons.append("free mail address (-20)")
    if enr.get("disposable"):
        flags.append("disposable_email")
    if any(_has(message, w) for w in SPAM) or message.count("http") > 2:
        flags.append("spam")
    for flag, cues in DISQUALIFY.items():
        if any(_has(message, w) for w in cues):
            flags.append(flag)
    if enr.get("company_conflict"):
        reasons.append(f"form says {form.get('company')!r}, CRM says {company.get('name')!r}: CRM wins")
        if not intent and employees >= 1000:
            flags.append("impersonation_risk")
    if not message.strip():
        reasons.append("no message")
    score = max(0, min(100, score))
    suspicious = {"spam", "disposable_email", "impersonation_risk", "fraud_signal"} & set(flags)
    if suspicious:
        tier = "suspicious"
    elif {"competitor", "student", "job_seeker"} & set(flags):
        tier = "disqualified"
    else:
        tier = "hot" if score >= 60 else "warm" if score >= 35 else "cold"
    return {"score": score, "tier": tier, "reasons": reasons, "flags": sorted(set(flags)), "offline": True}


def draft_reply(payload: dict[str, Any]) -> dict[str, Any]:
    """Personalised first reply: their name, company and question, the owner, three slots."""
    name = (payload.get("name") or "").strip().split(" ")[0] or "there"
    company = payload.get("company")
    owner = payload.get("owner") or {}
    slots = payload.get("slots") or []
    topic = (payload.get("message") or "").strip().rstrip(".")
    lines = [f"Hi {name},", ""]
    about = f" about {topic[:120].lower()}" if topic else ""
    lines.append(f"thanks for getting in touch{about}" + (f" on behalf of {company}." if company else "."))
    lines.append(f"I'm {owner.get('name', 'your account executive')} and I look after teams like yours.")
    if slots:
        lines.append("Would one of these times work for a 30-minute call? " + "; ".join(slots) + ".")
    else:
        lines.append("Reply with a time that suits you and I'll send an invite.")
    lines += ["", "Best regards,", owner.get("name", "The sales team")]
    subject = f"Your enquiry{' at ' + company if company else ''}"
    return {"subject": subject, "text": "\n".join(lines), "slots": slots, "offline": True}


async def send_outreach(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """The outreach agent: sends the approved draft through the gateway and reports what happened."""
    args = {
        "lead_id": payload["lead_id"],
        "to": payload["to"],
        "owner": payload.get("owner"),
        "subject": payload["subject"],
        "text": payload["text"],
        "prior_messages": int(payload.get("prior_messages") or 0),
    }
    result = await ctx.call_tool(
        "send_email",
        args,
        reasoning=f"lead scored {payload.get('score')} ({payload.get('tier')}); first message in the window",
        data_read=[f"crm:companies/{payload.get('domain')}", f"crm:outbox/{payload['to']}"],
    )
    if result.get("status") == "ok":
        return {"sent": True, "outcome": "ok", "message": result.get("output")}
    return {
        "sent": False,
        "outcome": result.get("code") or result.get("status"),
        "reason": result.get("reason"),
    }
