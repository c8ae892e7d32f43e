"""Offline agents and sandbox tools for the content-compliance template.

The sandbox is a small CMS (SQLite under ``$TOWER_HOME/sandbox/cms.sqlite``) seeded from
``data/`` on first use: products, content briefs, already-published pieces, and the tables the
workflow writes (review notes per draft, the editor queue, published content, returned briefs).

The writer, compliance and brand agents are deterministic heuristics so the workflow runs with
no model configured. The checks return actionable findings (which phrase, which rule, what to
do); the writer reads the findings of its previous draft from the CMS review notes and revises.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

from controltower.sandbox import SandboxDB, insert_rows, load_json

DATA = Path(__file__).resolve().parent / "data"
MODE = "offline-heuristic"
CHANNELS: dict[str, tuple[int, str]] = {  # channel -> (length limit, unit)
    "blog": (500, "words"),
    "landing_page": (250, "words"),
    "email": (160, "words"),
    "social": (280, "chars"),
    "ad": (180, "chars"),
}
SHORT_FORM = ("social", "ad")
DEFAULT_CTA = "Learn more at northwind.example."
DISCLAIMERS = {
    "finance": "Capital at risk. Past performance is not a reliable indicator of future results.",
    "health": "Food supplements should not replace a varied diet and are not intended to diagnose, treat, "
    "cure or prevent any disease.",
}
UNSUBSCRIBE = "You receive this because you subscribed; unsubscribe at any time in your settings."
CONSENT_REGIONS = ("UK", "EU")
PROHIBITED: list[tuple[str, str]] = [  # (pattern, why)
    (r"\bguarantee[ds]?\b", "guaranteed outcomes cannot be promised"),
    (r"\brisk[- ]free\b|\bno risk\b|\bcan(?:no|')t lose\b", "no product is free of risk"),
    (r"\bdouble your (?:money|savings)\b", "promises of growth need substantiation"),
    (r"\bcures?\b|\bheals?\b", "medicinal claims are not allowed for supplements or devices"),
    (r"\bclinically proven\b", "needs a cited clinical study"),
    (r"\b100% (?:safe|effective|secure)\b", "absolute safety or efficacy claims are not allowed"),
    (r"\bbest\b.*\bin the world\b|\bnumber one in the world\b", "unsubstantiated superlative"),
]
COMPETITORS = ("Contoso", "Fabrikam", "Litware")
EMAIL = re.compile(r"[\w.+-]+@(?!northwind\.example)[\w-]+\.[\w.]+")
PHONE = re.compile(r"\b0\d{4}\s?\d{6}\b|\+\d{2}\s?\d{3,4}\s?\d{3}\s?\d{3,4}")
BANNED_WORDS = {
    "cheap": "affordable",
    "revolutionary": "new",
    "game-changer": "step forward",
    "synergy": "teamwork",
    "world-class": "high-quality",
    "insane": "remarkable",
    "literally": "",
}
BRAND = "Northwind"
BRAND_MISSPELLINGS = ("NorthWind", "North Wind", "NORTHWIND", "North-Wind")
ACRONYMS = {"GBP", "AER", "FSCS", "ISA", "USB", "SMS", "API", "FAQ", "PDF", "USA", "EU", "UK"}
CTA_WORDS = ("learn more", "read", "open", "get started", "sign up", "shop", "try", "book", "find out")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS products (product TEXT PRIMARY KEY, category TEXT);
CREATE TABLE IF NOT EXISTS briefs (brief_id TEXT PRIMARY KEY, data TEXT, status TEXT);
CREATE TABLE IF NOT EXISTS published (
    key TEXT PRIMARY KEY, brief_id TEXT, channel TEXT, title TEXT, body TEXT, url TEXT);
CREATE TABLE IF NOT EXISTS review_notes (
    key TEXT PRIMARY KEY, run_id TEXT, brief_id TEXT, version INTEGER, draft TEXT, problems TEXT);
CREATE TABLE IF NOT EXISTS editor_queue (key TEXT PRIMARY KEY, brief_id TEXT, problems TEXT, draft TEXT);
CREATE TABLE IF NOT EXISTS returned (key TEXT PRIMARY KEY, brief_id TEXT, missing TEXT, to_addr TEXT);
"""
PRODUCT_CATEGORIES = {
    "Northwind Save": "finance",
    "Northwind Invest": "finance",
    "Northwind Vital": "health",
    "Northwind Home Hub": "none",
    "Northwind Sleep": "none",
    "Northwind Cloud Backup": "none",
}


def _seed(conn: sqlite3.Connection) -> None:
    insert_rows(conn, "products", [{"product": p, "category": c} for p, c in PRODUCT_CATEGORIES.items()])
    briefs = load_json(DATA / "briefs.json")
    insert_rows(
        conn, "briefs", [{"brief_id": b["brief_id"], "data": json.dumps(b), "status": "new"} for b in briefs]
    )
    insert_rows(conn, "published", load_json(DATA / "published.json"))


SANDBOX = SandboxDB("cms", _SCHEMA, _seed)


# --- tools ------------------------------------------------------------------------------


def get_brief(payload: dict[str, Any]) -> dict[str, Any]:
    """The brief, its product's regulatory category, and a live piece with the same title, if any."""
    brief_id = str(payload.get("brief_id") or "")
    with SANDBOX.session() as conn:
        row = conn.execute("SELECT data FROM briefs WHERE brief_id = ?", (brief_id,)).fetchone()
        if row is None:
            return {"found": False, "brief_id": brief_id}
        brief = json.loads(row["data"])
        cat = conn.execute(
            "SELECT category FROM products WHERE product = ?", (brief.get("product"),)
        ).fetchone()
        live = conn.execute(
            "SELECT url FROM published WHERE channel = ? AND lower(title) = lower(?)",
            (brief.get("channel"), brief.get("title") or ""),
        ).fetchone()
    return {
        "found": True,
        "brief": brief,
        "category": cat["category"] if cat else None,
        "published_as": live["url"] if live else None,
    }


def get_review_notes(payload: dict[str, Any]) -> dict[str, Any]:
    """The newest draft of this run and the problems the checks found in it."""
    with SANDBOX.session() as conn:
        row = conn.execute(
            "SELECT version, draft, problems FROM review_notes WHERE run_id = ? AND brief_id = ? "
            "ORDER BY version DESC LIMIT 1",
            (payload["run_id"], payload["brief_id"]),
        ).fetchone()
    if row is None:
        return {"version": 0, "draft": None, "problems": []}
    return {
        "version": row["version"],
        "draft": json.loads(row["draft"]),
        "problems": json.loads(row["problems"]),
    }


def save_review(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Store a draft version with both checks' findings (the writer revises from these)."""
    problems = list((payload.get("compliance") or {}).get("problems") or []) + list(
        (payload.get("brand") or {}).get("problems") or []
    )
    with SANDBOX.session() as conn:
        conn.execute(
            "INSERT OR IGNORE INTO review_notes VALUES (?, ?, ?, ?, ?, ?)",
            (
                ctx.idempotency_key,
                ctx.run_id,
                payload["brief_id"],
                int(payload["version"]),
                json.dumps(payload.get("draft")),
                json.dumps(problems),
            ),
        )
    return {"version": payload["version"], "rules": sorted({str(p.get("rule")) for p in problems})}


def publish(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Publish to the channel (the sandbox CMS). Idempotent by the step's key."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(payload["title"]).lower()).strip("-")[:60]
    url = f"https://northwind.example/{payload['channel']}/{slug}"
    with SANDBOX.session() as conn:
        cur = conn.execute(
            "INSERT OR IGNORE INTO published VALUES (?, ?, ?, ?, ?, ?)",
            (
                ctx.idempotency_key,
                payload["brief_id"],
                payload["channel"],
                payload["title"],
                payload["body"],
                url,
            ),
        )
        conn.execute("UPDATE briefs SET status = 'published' WHERE brief_id = ?", (payload["brief_id"],))
    return {"url": url, "duplicate": cur.rowcount == 0}


def send_to_editor(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    with SANDBOX.session() as conn:
        conn.execute(
            "INSERT OR IGNORE INTO editor_queue VALUES (?, ?, ?, ?)",
            (
                ctx.idempotency_key,
                payload["brief_id"],
                json.dumps(payload.get("problems")),
                payload.get("body", ""),
            ),
        )
        conn.execute("UPDATE briefs SET status = 'with_editor' WHERE brief_id = ?", (payload["brief_id"],))
    return {"queue": "editors", "brief_id": payload["brief_id"]}


def return_brief(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    with SANDBOX.session() as conn:
        conn.execute(
            "INSERT OR IGNORE INTO returned VALUES (?, ?, ?, ?)",
            (
                ctx.idempotency_key,
                payload["brief_id"],
                json.dumps(payload.get("missing")),
                payload.get("to", ""),
            ),
        )
        conn.execute("UPDATE briefs SET status = 'returned' WHERE brief_id = ?", (payload["brief_id"],))
    return {"returned_to": payload.get("to"), "missing": payload.get("missing")}


# --- agents -----------------------------------------------------------------------------


def check_brief(payload: dict[str, Any]) -> dict[str, Any]:
    """Is the brief complete and new? Lists what is missing (the requester gets it back)."""
    record = payload.get("record") or {}
    if not record.get("found"):
        return {"complete": False, "missing": ["brief"], "notes": "no such brief", "brief": {}, "mode": MODE}
    brief = dict(record["brief"])
    missing = [f for f in ("product", "channel", "key_points") if not brief.get(f)]
    notes = []
    if brief.get("channel") and brief["channel"] not in CHANNELS:
        missing.append("channel")
        notes.append(f"unknown channel {brief['channel']!r}; use one of {', '.join(CHANNELS)}")
    brief["category"] = record.get("category") or "none"
    return {
        "complete": not missing,
        "missing": missing,
        "notes": "; ".join(notes),
        "brief": brief,
        "duplicate_of": record.get("published_as"),
        "mode": MODE,
    }


def render(draft: dict[str, Any], channel: str) -> str:
    """The text that is checked and published."""
    label = [f"{draft['label']}:"] if draft.get("label") else []
    sentences = list(draft.get("sentences") or [])
    tail = [draft["cta"]] if draft.get("cta") else []
    if channel in SHORT_FORM:
        return " ".join(label + sentences + tail + list(draft.get("disclaimers") or []))
    blocks = [" ".join(label + sentences), " ".join(tail), "\n".join(draft.get("disclaimers") or [])]
    return "\n\n".join(b for b in blocks if b)


def measure(text: str, channel: str) -> tuple[int, int, str]:
    limit, unit = CHANNELS.get(channel, (500, "words"))
    size = len(text) if unit == "chars" else len(text.split())
    return size, limit, unit


def _remove_sentences(sentences: list[str], phrase: str) -> list[str]:
    return [s for s in sentences if phrase.lower() not in s.lower()]


def _revise(draft: dict[str, Any], problems: list[dict[str, Any]], channel: str) -> dict[str, Any]:
    sentences = list(draft.get("sentences") or [])
    disclaimers = list(draft.get("disclaimers") or [])
    revised = {**draft}
    for p in problems:
        rule, phrase = p.get("rule"), str(p.get("phrase") or "")
        if rule in ("prohibited_claim", "personal_data", "competitor") and phrase:
            sentences = _remove_sentences(sentences, phrase)
        elif rule in ("missing_disclaimer", "missing_unsubscribe") and p.get("text") not in disclaimers:
            disclaimers.append(str(p["text"]))
        elif rule == "missing_label":
            revised["label"] = str(p.get("text") or "Sponsored")
        elif rule in ("banned_word", "brand_name", "shouting") and phrase:
            pattern = re.compile(
                r"\s*\b" + re.escape(phrase) + r"\b" if not p.get("suggest") else re.escape(phrase)
            )
            sentences = [pattern.sub(str(p.get("suggest") or ""), s) for s in sentences]
        elif rule == "exclamation":
            sentences = [re.sub(r"!+", ".", s) for s in sentences]
        elif rule == "missing_cta":
            revised["cta"] = DEFAULT_CTA
    revised["sentences"], revised["disclaimers"] = sentences, disclaimers
    if any(p.get("rule") == "too_long" for p in problems):
        # keep the label, call to action and disclaimers; drop the last points while too long
        while len(revised["sentences"]) > 1:
            size, limit, _ = measure(render(revised, channel), channel)
            if size <= limit:
                break
            revised["sentences"] = revised["sentences"][:-1]
    return revised


async def write_draft(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """First draft from the brief; later drafts revise the previous one from the review notes."""
    brief = payload.get("brief") or {}
    channel = str(brief.get("channel") or "blog")
    attempt = int(payload.get("attempt") or 1)
    notes: dict[str, Any] = {"draft": None, "problems": []}
    if attempt > 1:
        args = {"brief_id": brief.get("brief_id", ""), "run_id": ctx.run_id}
        if getattr(ctx, "gate", None) is None:
            notes = get_review_notes(args)
        else:
            found = await ctx.call_tool(
                "get_review_notes", args, reasoning="revise the previous draft from the checks' findings"
            )
            notes = found.get("output") or notes
    if notes.get("draft"):
        draft = _revise(notes["draft"], notes.get("problems") or [], channel)
    else:
        draft = {
            "title": brief.get("title") or brief.get("product") or "Untitled",
            "label": None,
            "sentences": [str(s).strip() for s in brief.get("key_points") or [] if str(s).strip()],
            "cta": brief.get("cta") or DEFAULT_CTA,
            "disclaimers": [],
        }
    draft["version"] = attempt
    draft["text"] = render(draft, channel)
    draft["addressed"] = [p.get("rule") for p in notes.get("problems") or []]
    draft["mode"] = MODE
    return draft


def check_compliance(payload: dict[str, Any]) -> dict[str, Any]:
    """Regulatory review: prohibited claims, personal data, comparisons, disclaimers, labels."""
    brief, draft = payload.get("brief") or {}, payload.get("draft") or {}
    channel, text = str(brief.get("channel") or ""), str(draft.get("text") or "")
    problems: list[dict[str, Any]] = []
    for sentence in draft.get("sentences") or []:
        for pattern, why in PROHIBITED:
            if m := re.search(pattern, sentence, re.IGNORECASE):
                problems.append(
                    {"check": "compliance", "rule": "prohibited_claim", "phrase": m.group(0), "why": why}
                )
                break
        for m in [*EMAIL.finditer(sentence), *PHONE.finditer(sentence)]:
            problems.append({"check": "compliance", "rule": "personal_data", "phrase": m.group(0)})
        for name in COMPETITORS:
            if name.lower() in sentence.lower():
                problems.append(
                    {"check": "compliance", "rule": "competitor", "phrase": name, "why": "comparative claim"}
                )
    disclaimer = DISCLAIMERS.get(str(brief.get("category")))
    if disclaimer and disclaimer not in text:
        problems.append({"check": "compliance", "rule": "missing_disclaimer", "text": disclaimer})
    if channel == "email" and brief.get("region") in CONSENT_REGIONS and UNSUBSCRIBE not in text:
        problems.append({"check": "compliance", "rule": "missing_unsubscribe", "text": UNSUBSCRIBE})
    if channel == "ad" and not text.startswith("Sponsored"):
        problems.append({"check": "compliance", "rule": "missing_label", "text": "Sponsored"})
    if not draft.get("sentences"):
        problems.append(
            {"check": "compliance", "rule": "no_key_points", "why": "nothing publishable is left"}
        )
    return {"passed": not problems, "problems": problems, "mode": MODE}


def check_brand(payload: dict[str, Any]) -> dict[str, Any]:
    """Brand and style: banned words, the brand name, shouting, exclamation marks, length, CTA."""
    brief, draft = payload.get("brief") or {}, payload.get("draft") or {}
    channel, text = str(brief.get("channel") or "blog"), str(draft.get("text") or "")
    body = " ".join(draft.get("sentences") or [])
    problems: list[dict[str, Any]] = []
    for word, better in BANNED_WORDS.items():
        if re.search(rf"\b{re.escape(word)}\b", body, re.IGNORECASE):
            found = re.search(rf"\b{re.escape(word)}\b", body, re.IGNORECASE)
            phrase = found.group(0) if found else word
            problems.append({"check": "brand", "rule": "banned_word", "phrase": phrase, "suggest": better})
    for wrong in BRAND_MISSPELLINGS:
        if wrong in body:
            problems.append({"check": "brand", "rule": "brand_name", "phrase": wrong, "suggest": BRAND})
    for word in sorted(set(re.findall(r"\b[A-Z]{4,}\b", body)) - ACRONYMS):
        if word not in BRAND_MISSPELLINGS:
            problems.append(
                {"check": "brand", "rule": "shouting", "phrase": word, "suggest": word.capitalize()}
            )
    if body.count("!") > 1:
        problems.append({"check": "brand", "rule": "exclamation", "why": "one exclamation mark at most"})
    size, limit, unit = measure(text, channel)
    if size > limit:
        problems.append({"check": "brand", "rule": "too_long", "size": size, "limit": limit, "unit": unit})
    if not any(w in str(draft.get("cta") or "").lower() for w in CTA_WORDS):
        problems.append({"check": "brand", "rule": "missing_cta"})
    return {"passed": not problems, "problems": problems, "size": size, "limit": limit, "mode": MODE}
