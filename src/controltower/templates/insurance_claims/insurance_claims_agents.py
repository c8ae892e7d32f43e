"""Offline agents and sandbox tools for the insurance-claims template.

The sandbox is a small claims system (SQLite under ``$TOWER_HOME/sandbox/claims.sqlite``)
seeded from ``data/`` on first use: policies, claims with their documents, and the tables the
workflow writes to (customer outbox, investigation queue, payouts, decisions). The agents are
deterministic heuristics (coverage rules, document checklists, weighted fraud signals), so the
workflow runs with no model configured; the output says ``"mode": "offline-heuristic"``.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import date
from pathlib import Path
from typing import Any

from controltower.sandbox import SandboxDB, insert_rows, load_json

DATA = Path(__file__).resolve().parent / "data"
MODE = "offline-heuristic"

# Payable amounts at or below this (in cents) are paid without a human. The same number is in
# policies/claims.cedar (the gateway enforces it); keep the two in step.
AUTO_APPROVE_LIMIT_CENTS = 250_000

REQUIRED_DOCUMENTS: dict[str, list[str]] = {
    "auto_collision": ["photos", "repair_estimate"],
    "auto_theft": ["police_report"],
    "auto_glass": ["repair_invoice"],
    "home_water": ["photos", "repair_invoice"],
    "home_burglary": ["police_report", "receipts"],
    "home_storm": ["photos", "repair_invoice"],
    "travel_delay": ["boarding_pass", "receipts"],
    "travel_medical": ["medical_report", "receipts"],
    "travel_baggage": ["baggage_report", "receipts"],
}
AMOUNT_DOCUMENTS = ("repair_estimate", "repair_invoice", "receipts")
FRAUD_WEIGHTS: dict[str, float] = {
    "duplicate_claim": 0.6,
    "frequent_claims": 0.5,
    "early_claim": 0.3,
    "payee_mismatch": 0.3,
    "bank_details_changed": 0.3,
    "amount_conflict": 0.3,
    "late_report": 0.2,
    "just_below_threshold": 0.2,
    "suspicious_wording": 0.2,
}
FRAUD_THRESHOLD = 0.5
DECIDED = ("paid", "denied", "investigation")
SUSPICIOUS_PHRASES = (
    "cash only",
    "paid in cash",
    "no receipt",
    "lost all receipts",
    "friend's garage",
    "urgent",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS policies (
    policy_no TEXT PRIMARY KEY, holder TEXT, email TEXT, phone TEXT, product TEXT,
    coverage_limit_cents INTEGER, deductible_cents INTEGER, status TEXT,
    start_date TEXT, end_date TEXT, iban TEXT, iban_changed_on TEXT);
CREATE TABLE IF NOT EXISTS claims (
    claim_id TEXT PRIMARY KEY, policy_no TEXT, claim_type TEXT, incident_date TEXT,
    reported_date TEXT, amount_cents INTEGER, description TEXT, documents TEXT,
    payee_iban TEXT, status TEXT);
CREATE TABLE IF NOT EXISTS outbox (key TEXT PRIMARY KEY, claim_id TEXT, to_addr TEXT, body TEXT);
CREATE TABLE IF NOT EXISTS investigations (
    key TEXT PRIMARY KEY, claim_id TEXT, score REAL, signals TEXT, status TEXT);
CREATE TABLE IF NOT EXISTS payouts (
    key TEXT PRIMARY KEY, claim_id TEXT, amount_cents INTEGER, iban TEXT);
CREATE TABLE IF NOT EXISTS decisions (key TEXT PRIMARY KEY, claim_id TEXT, decision TEXT, reason TEXT);
"""


def _seed(conn: sqlite3.Connection) -> None:
    insert_rows(conn, "policies", load_json(DATA / "policies.json"))
    claims = load_json(DATA / "claims.json")
    insert_rows(conn, "claims", [{**c, "documents": json.dumps(c.get("documents") or [])} for c in claims])


SANDBOX = SandboxDB("claims", _SCHEMA, _seed)


# --- tools ------------------------------------------------------------------------------


def get_claim(payload: dict[str, Any]) -> dict[str, Any]:
    """The claim, its policy and the policy's other claims (for duplicate and frequency checks)."""
    claim_id = str(payload.get("claim_id") or "")
    with SANDBOX.session() as conn:
        row = conn.execute("SELECT * FROM claims WHERE claim_id = ?", (claim_id,)).fetchone()
        if row is None:
            return {"found": False, "claim_id": claim_id}
        claim = dict(row)
        claim["documents"] = json.loads(claim["documents"] or "[]")
        policy = None
        others: list[dict[str, Any]] = []
        if claim["policy_no"]:
            prow = conn.execute(
                "SELECT * FROM policies WHERE policy_no = ?", (claim["policy_no"],)
            ).fetchone()
            policy = dict(prow) if prow else None
            others = [
                dict(r)
                for r in conn.execute(
                    "SELECT claim_id, claim_type, incident_date, reported_date, amount_cents, status "
                    "FROM claims WHERE policy_no = ? AND claim_id != ?",
                    (claim["policy_no"], claim_id),
                )
            ]
    return {"found": True, "claim": claim, "policy": policy, "other_claims": others}


def request_documents(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Send the customer a message (sandbox outbox), de-duplicated by the idempotency key."""
    with SANDBOX.session() as conn:
        cur = conn.execute(
            "INSERT OR IGNORE INTO outbox VALUES (?, ?, ?, ?)",
            (ctx.idempotency_key, payload["claim_id"], payload["to"], payload["body"]),
        )
        conn.execute(
            "UPDATE claims SET status = 'awaiting_documents' WHERE claim_id = ?", (payload["claim_id"],)
        )
    return {"sent": True, "duplicate": cur.rowcount == 0, "to": payload["to"]}


def open_investigation(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Put the claim in the special-investigations queue (a human team works it)."""
    with SANDBOX.session() as conn:
        conn.execute(
            "INSERT OR IGNORE INTO investigations VALUES (?, ?, ?, ?, 'open')",
            (
                ctx.idempotency_key,
                payload["claim_id"],
                payload.get("score"),
                json.dumps(payload.get("signals")),
            ),
        )
        conn.execute("UPDATE claims SET status = 'investigation' WHERE claim_id = ?", (payload["claim_id"],))
        depth = conn.execute("SELECT COUNT(*) FROM investigations WHERE status = 'open'").fetchone()[0]
    return {"queue": "special-investigations", "claim_id": payload["claim_id"], "queue_depth": depth}


def record_decision(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    with SANDBOX.session() as conn:
        conn.execute(
            "INSERT OR IGNORE INTO decisions VALUES (?, ?, ?, ?)",
            (ctx.idempotency_key, payload["claim_id"], payload["decision"], payload.get("reason", "")),
        )
        conn.execute(
            "UPDATE claims SET status = ? WHERE claim_id = ?", (payload["decision"], payload["claim_id"])
        )
    return {"claim_id": payload["claim_id"], "decision": payload["decision"]}


def pay_claim(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Pay the claim (irreversible). The idempotency key makes a repeated request a no-op."""
    with SANDBOX.session() as conn:
        cur = conn.execute(
            "INSERT OR IGNORE INTO payouts VALUES (?, ?, ?, ?)",
            (ctx.idempotency_key, payload["claim_id"], payload["amount_cents"], payload["iban"]),
        )
        conn.execute("UPDATE claims SET status = 'paid' WHERE claim_id = ?", (payload["claim_id"],))
    return {
        "paid_cents": payload["amount_cents"],
        "claim_id": payload["claim_id"],
        "duplicate": cur.rowcount == 0,
        "reference": f"PAY-{ctx.idempotency_key[-12:]}",
    }


# --- agents -----------------------------------------------------------------------------


def _day(value: Any) -> date | None:
    try:
        return date.fromisoformat(str(value)) if value else None
    except ValueError:
        return None


def assess_claim(payload: dict[str, Any]) -> dict[str, Any]:
    """Coverage, completeness and the payable amount: the adjuster's checklist."""
    record = payload.get("record") or {}
    if not record.get("found"):
        return {
            "valid": False,
            "reason": f"no claim {record.get('claim_id')!r} in the claims system",
            "mode": MODE,
        }
    claim, policy = record["claim"], record.get("policy")
    if claim.get("status") in DECIDED:
        return {
            "valid": False,
            "reason": f"claim {claim['claim_id']} is already {claim['status']}",
            "mode": MODE,
        }
    missing_fields = [f for f in ("policy_no", "amount_cents", "incident_date") if claim.get(f) in (None, "")]
    if claim.get("policy_no") and policy is None:
        missing_fields.append("policy_no")
    if not (claim.get("description") or "").strip():
        missing_fields.append("description")
    missing_fields = [("amount" if f == "amount_cents" else f) for f in dict.fromkeys(missing_fields)]
    ctype = str(claim.get("claim_type") or "")
    have = {d.get("kind") for d in claim.get("documents") or []}
    missing_docs = [d for d in REQUIRED_DOCUMENTS.get(ctype, []) if d not in have]
    result: dict[str, Any] = {
        "valid": True,
        "claim_id": claim["claim_id"],
        "claim_type": ctype,
        "missing_fields": missing_fields,
        "missing_documents": missing_docs,
        "covered": True,
        "reason": "",
        "payable_cents": 0,
        "mode": MODE,
    }
    if policy is None:
        result.update(covered=None, reason="the claim cannot be matched to a policy")
        return result
    incident = _day(claim.get("incident_date"))
    start, end = _day(policy.get("start_date")), _day(policy.get("end_date"))
    if policy.get("status") != "active" or (incident and start and end and not start <= incident <= end):
        result.update(covered=False, reason="the policy was not in force on the incident date")
        return result
    if not ctype.startswith(f"{policy.get('product')}_"):
        result.update(covered=False, reason=f"{ctype} is not covered by a {policy.get('product')} policy")
        return result
    amount = claim.get("amount_cents")
    if amount is None:
        return result
    payable = min(int(amount), int(policy["coverage_limit_cents"])) - int(policy["deductible_cents"])
    if payable <= 0:
        result.update(covered=False, reason="the loss is below the policy's deductible")
        return result
    result["payable_cents"] = payable
    result["capped"] = int(amount) > int(policy["coverage_limit_cents"])
    result["approval_required"] = payable > AUTO_APPROVE_LIMIT_CENTS
    return result


def screen_fraud(payload: dict[str, Any]) -> dict[str, Any]:
    """Weighted fraud indicators, each explained; at or above the threshold a human investigates."""
    record = payload.get("record") or {}
    if not record.get("found"):
        return {"score": 0.0, "signals": [], "fraud": False, "mode": MODE}
    claim, policy = record["claim"], record.get("policy") or {}
    signals: dict[str, str] = {}
    incident, reported = _day(claim.get("incident_date")), _day(claim.get("reported_date"))
    amount = claim.get("amount_cents")
    for other in record.get("other_claims") or []:
        same_loss = other.get("claim_type") == claim.get("claim_type") and other.get(
            "incident_date"
        ) == claim.get("incident_date")
        if same_loss and (other.get("reported_date") or "", other["claim_id"]) < (
            claim.get("reported_date") or "",
            claim["claim_id"],
        ):
            signals["duplicate_claim"] = f"same loss already claimed as {other['claim_id']}"
    recent = [
        o
        for o in record.get("other_claims") or []
        if incident and (d := _day(o.get("incident_date"))) and 0 < (incident - d).days <= 365
    ]
    if len(recent) >= 3:
        signals["frequent_claims"] = f"{len(recent)} earlier claims on this policy within 12 months"
    start = _day(policy.get("start_date"))
    if incident and start and 0 <= (incident - start).days <= 30:
        signals["early_claim"] = f"incident {(incident - start).days} days after the policy started"
    if policy.get("iban") and claim.get("payee_iban") and claim["payee_iban"] != policy["iban"]:
        signals["payee_mismatch"] = "payout account differs from the account on file"
    changed = _day(policy.get("iban_changed_on"))
    if changed and reported and abs((reported - changed).days) <= 30:
        signals["bank_details_changed"] = f"bank details changed on {changed.isoformat()}"
    invoiced = [int(d["amount_cents"]) for d in claim.get("documents") or [] if d.get("amount_cents")]
    if amount and invoiced and int(amount) > 1.2 * max(invoiced):
        signals["amount_conflict"] = f"claimed {amount} but documents show at most {max(invoiced)}"
    if incident and reported and (reported - incident).days > 60:
        signals["late_report"] = f"reported {(reported - incident).days} days after the incident"
    if amount and 0.9 * AUTO_APPROVE_LIMIT_CENTS <= int(amount) <= AUTO_APPROVE_LIMIT_CENTS:
        signals["just_below_threshold"] = "amount sits just under the auto-approval limit"
    text = (claim.get("description") or "").lower()
    found = [p for p in SUSPICIOUS_PHRASES if p in text]
    if found:
        signals["suspicious_wording"] = "description mentions " + ", ".join(found)
    score = round(min(1.0, sum(FRAUD_WEIGHTS[s] for s in signals)), 2)
    return {
        "score": score,
        "fraud": score >= FRAUD_THRESHOLD,
        "signals": sorted(signals),
        "explanations": signals,
        "mode": MODE,
    }


async def contact_customer(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Write to the customer for what is missing, through the governed ``request_documents`` tool."""
    record = payload.get("record") or {}
    assessment = payload.get("assessment") or {}
    claim, policy = record.get("claim") or {}, record.get("policy") or {}
    docs = [d.replace("_", " ") for d in assessment.get("missing_documents") or []]
    fields = assessment.get("missing_fields") or []
    asks = []
    if docs:
        asks.append("the following documents: " + ", ".join(docs))
    if "amount" in fields:
        asks.append("the amount you are claiming, with an estimate or invoice")
    if "policy_no" in fields:
        asks.append("your policy number")
    if "description" in fields:
        asks.append("a short description of what happened")
    name = str(policy.get("holder") or "there").split()[0]
    body = (
        f"Hello {name}, thank you for your claim {claim.get('claim_id')}. To process it we need "
        + "; and ".join(asks)
        + ". Reply to this e-mail or upload them in your account; we will pick the claim up as soon "
        "as they arrive."
    )
    to = policy.get("email") or "claims-intake@example.com"
    args = {"claim_id": claim.get("claim_id", ""), "to": to, "body": body}
    if getattr(ctx, "gate", None) is None:  # ungoverned engine: tools run directly, like tool steps
        result: dict[str, Any] = {"status": "ok", "output": request_documents(args, ctx)}
    else:
        result = await ctx.call_tool(
            "request_documents",
            args,
            reasoning="required documents or fields are missing: " + "; ".join(asks),
            data_read=[f"claims/{claim.get('claim_id')}", f"policies/{policy.get('policy_no')}"],
        )
    return {"sent": result.get("status") == "ok", "status": result.get("status"), "to": to, "body": body}
