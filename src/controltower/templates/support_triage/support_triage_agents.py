"""Offline agents and sandbox tools for the support-triage template.

The sandbox "helpdesk" is a SQLite file at ``$TOWER_HOME/sandbox/helpdesk.sqlite`` (TOWER_HOME
defaults to ``.tower``), created and seeded from ``data/`` on first use. The drafter and the
reviewer are deterministic heuristics so the workflow runs with no model configured; they keep
the same input and output contract as the LLM agents that replace them.
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path
from typing import Any

from controltower.sandbox import SandboxDB, insert_rows, load_json

DATA = Path(__file__).resolve().parent / "data"
BANNED = ("unfortunately", "obviously", "just", "simply")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS kb_articles (
  id TEXT PRIMARY KEY, category TEXT NOT NULL, title TEXT NOT NULL, answer TEXT NOT NULL,
  keywords TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS customers (
  email TEXT PRIMARY KEY, name TEXT, tier TEXT, status TEXT NOT NULL DEFAULT 'active');
CREATE TABLE IF NOT EXISTS tickets (
  id TEXT PRIMARY KEY, subject TEXT, body TEXT, email TEXT, customer TEXT, tier TEXT);
CREATE TABLE IF NOT EXISTS replies (
  key TEXT PRIMARY KEY, ticket TEXT NOT NULL, to_addr TEXT NOT NULL, subject TEXT,
  text TEXT NOT NULL, sent_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS escalations (
  key TEXT PRIMARY KEY, ticket TEXT NOT NULL, queue TEXT NOT NULL, reason TEXT,
  priority TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS duplicates (
  key TEXT PRIMARY KEY, ticket TEXT NOT NULL, original TEXT NOT NULL, created_at REAL NOT NULL);
"""


def _seed(conn: sqlite3.Connection) -> None:
    for table in ("kb_articles", "customers"):
        insert_rows(conn, table, load_json(DATA / f"{table}.json"))
    insert_rows(conn, "tickets", [t for t in load_json(DATA / "tickets.json") if t.get("id")])


SANDBOX = SandboxDB("helpdesk", _SCHEMA, _seed, autocommit=True)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


# -- tools (called through the governed gateway) ---------------------------------------------


def ticket_history(payload: dict[str, Any]) -> dict[str, Any]:
    """Was this ticket (or the same question from the same sender) already answered?"""
    email = (payload.get("email") or "").strip().lower()
    subject = (payload.get("subject") or "").strip().lower()
    with SANDBOX.session() as conn:
        row = conn.execute(
            "SELECT r.ticket FROM replies r LEFT JOIN tickets t ON t.id = r.ticket "
            "WHERE r.ticket = ? OR (r.to_addr = ? AND lower(coalesce(r.subject, '')) = ? AND ? != '') "
            "ORDER BY r.sent_at LIMIT 1",
            (payload.get("ticket"), email, subject, email),
        ).fetchone()
        customer = conn.execute("SELECT * FROM customers WHERE email = ?", (email,)).fetchone()
    return {
        "answered": row is not None,
        "original": row["ticket"] if row is not None else None,
        "customer": dict(customer) if customer is not None else None,
    }


def kb_search(payload: dict[str, Any]) -> dict[str, Any]:
    """The article of the category that shares most words with the question."""
    category = str(payload.get("category") or "other")
    question = _words(str(payload.get("question") or ""))
    with SANDBOX.session() as conn:
        rows = conn.execute("SELECT * FROM kb_articles WHERE category = ?", (category,)).fetchall()
        if not rows:
            rows = conn.execute("SELECT * FROM kb_articles WHERE category = 'other'").fetchall()
    best = max(rows, key=lambda r: (len(question & set(r["keywords"].split())), -int(r["id"][3:])))
    return {"id": best["id"], "title": best["title"], "answer": best["answer"], "category": best["category"]}


def send_reply(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Put the reply in the sandbox outbox; the step's idempotency key makes a retry a no-op."""
    key = ctx.idempotency_key
    with SANDBOX.session() as conn:
        done = conn.execute(
            "INSERT OR IGNORE INTO replies VALUES (?, ?, ?, ?, ?, ?)",
            (
                key,
                payload["ticket"],
                payload["to"].lower(),
                payload.get("subject"),
                payload["text"],
                time.time(),
            ),
        ).rowcount
    return {"sent": True, "duplicate": done == 0, "key": key}


def escalate(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    category = payload.get("category")
    queue = {"security": "security", "fraud": "trust-and-safety"}.get(str(category), "tier-two")
    priority = "high" if queue != "tier-two" or payload.get("sentiment") == "angry" else "normal"
    with SANDBOX.session() as conn:
        conn.execute(
            "INSERT OR IGNORE INTO escalations VALUES (?, ?, ?, ?, ?, ?)",
            (ctx.idempotency_key, payload["ticket"], queue, payload.get("reason"), priority, time.time()),
        )
    return {
        "queue": queue,
        "ticket": payload.get("ticket"),
        "priority": priority,
        "reason": payload.get("reason"),
    }


def link_duplicate(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    with SANDBOX.session() as conn:
        conn.execute(
            "INSERT OR IGNORE INTO duplicates VALUES (?, ?, ?, ?)",
            (ctx.idempotency_key, payload["ticket"], payload["original"], time.time()),
        )
    return {"linked": True, "ticket": payload["ticket"], "original": payload["original"]}


# -- agents (offline heuristics; same contract as the LLM agents) -----------------------------


def draft_reply(payload: dict[str, Any]) -> dict[str, Any]:
    """Brand voice: greet by name, answer from the article, cite it, sign off.

    First drafts for some customers are sloppy on purpose, so the quality loop has work to do.
    """
    article = payload.get("article") or {}
    customer = (payload.get("customer") or "").strip() or "there"
    attempt = int(payload.get("attempt") or 1)
    feedback = (payload.get("feedback") or {}).get("problems", [])
    opener = f"Hi {customer}, thanks for reaching out."
    body = article.get("answer", "")
    if attempt == 1 and len(customer) % 2 == 0 and body:
        body = "Unfortunately " + body[0].lower() + body[1:]
    text = f"{opener} {body}"
    if attempt > 1 or not feedback:
        text += f" (See {article.get('id', 'our help centre')}: {article.get('title', '')}.)"
    text += " Best regards, the Support team"
    return {"text": text, "attempt": attempt, "article": article.get("id"), "offline": True}


def review_reply(payload: dict[str, Any]) -> dict[str, Any]:
    """Quality check: tone (no banned words), accuracy (cites the article), coverage."""
    draft = (payload.get("draft") or {}).get("text", "")
    article = payload.get("article") or {}
    problems = []
    lowered = draft.lower()
    if any(word in lowered.split() or lowered.startswith(word) for word in BANNED):
        problems.append("tone: avoid 'unfortunately', 'just', 'simply', 'obviously'")
    if article.get("id") and article["id"] not in draft:
        problems.append(f"accuracy: cite the article {article['id']}")
    if article.get("answer") and article["answer"][:40] not in draft:
        problems.append("accuracy: the answer must come from the article")
    if article.get("category") == "other":
        problems.append("coverage: no specific article; a human should answer")
    score = round(max(0.0, 1.0 - 0.4 * len(problems)), 2)
    return {"passed": not problems, "score": score, "problems": problems}


# (category, confidence, sentiment, cue words) in priority order: risk first, then the queues
CATEGORIES: tuple[tuple[str, float, str, tuple[str, ...]], ...] = (
    ("fraud", 0.9, "neutral", ("bank details", "gift card", "wire transfer", "crypto", "iban")),
    ("security", 0.95, "worried", ("hacked", "breach", "phishing", "suspicious login")),
    ("complaint", 0.8, "angry", ("lawyer", "unacceptable", "furious", "worst", "ridiculous")),
    (
        "billing",
        0.85,
        "neutral",
        ("refund", "charged", "invoice", "vat", "receipt", "payment", "duplicate charge"),
    ),
    ("cancellation", 0.8, "neutral", ("cancel", "downgrade", "close my account")),
    (
        "account",
        0.9,
        "neutral",
        ("password", "log in", "login", "2fa", "two-factor", "sso", "single sign-on"),
    ),
    ("api", 0.8, "neutral", ("api", "rate limit", "webhook")),
    ("how-to", 0.75, "neutral", ("export", "csv", "how do i", "how can i", "import")),
    ("bug", 0.6, "frustrated", ("error", "crash", "broken", "not working", "500")),
)


def classify_ticket(payload: dict[str, Any]) -> dict[str, Any]:
    """Queue, confidence and mood from cue words; the first matching category wins."""
    text = f"{payload.get('subject') or ''} {payload.get('body') or ''}".lower()
    for category, confidence, sentiment, cues in CATEGORIES:
        hits = [c for c in cues if re.search(r"\b" + re.escape(c), text)]
        if hits:
            return {
                "category": category,
                "confidence": confidence,
                "sentiment": sentiment,
                "signals": sorted(hits),
                "offline": True,
            }
    return {"category": "other", "confidence": 0.4, "sentiment": "neutral", "signals": [], "offline": True}
