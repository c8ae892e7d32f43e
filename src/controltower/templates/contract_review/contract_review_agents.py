"""Offline agents and sandbox tools for the contract-review template.

The sandbox is a small contract-lifecycle system (SQLite under ``$TOWER_HOME/sandbox/clm.sqlite``)
seeded from ``data/`` on first use: contracts in review (and some already signed), the vendor
master (country, risk rating, sanctions flag, bank account), price benchmarks per category, and
the delegation-of-authority matrix of signatories. The workflow writes the signature queue and
contracts returned to their requesters.

The three reviewers and the report writer are deterministic heuristics (clause rules, vendor
screening, benchmark percentiles), so the workflow runs with no model configured; each finding
names its area, severity, what is wrong and what to do.
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
SEVERITY = {"none": 0, "low": 1, "medium": 2, "high": 3, "critical": 4}
APPROVED_LAW = ("England and Wales", "Ireland", "Germany", "Netherlands", "France", "New York", "Delaware")
ADEQUATE = {  # EEA plus countries with an adequacy decision: no transfer clauses needed
    "AT",
    "BE",
    "BG",
    "HR",
    "CY",
    "CZ",
    "DK",
    "EE",
    "FI",
    "FR",
    "DE",
    "GR",
    "HU",
    "IE",
    "IT",
    "LV",
    "LT",
    "LU",
    "MT",
    "NL",
    "PL",
    "PT",
    "RO",
    "SK",
    "SI",
    "ES",
    "SE",
    "IS",
    "LI",
    "NO",
    "GB",
    "CH",
    "JP",
    "KR",
    "NZ",
    "IL",
    "CA",
    "US",
}
MAX_RENEWAL_NOTICE_DAYS = 90
MAX_PRICE_INCREASE_PCT = 5
MAX_TERM_MONTHS = 36

_SCHEMA = """
CREATE TABLE IF NOT EXISTS contracts (contract_id TEXT PRIMARY KEY, data TEXT, status TEXT);
CREATE TABLE IF NOT EXISTS vendors (
    name TEXT PRIMARY KEY, country TEXT, risk_rating TEXT, sanctioned INTEGER, bank_account TEXT);
CREATE TABLE IF NOT EXISTS benchmarks (
    category TEXT PRIMARY KEY, unit TEXT, p25_cents INTEGER, median_cents INTEGER, p75_cents INTEGER);
CREATE TABLE IF NOT EXISTS signatories (
    email TEXT PRIMARY KEY, name TEXT, title TEXT, department TEXT, limit_cents INTEGER);
CREATE TABLE IF NOT EXISTS signature_queue (
    key TEXT PRIMARY KEY, contract_id TEXT, signatory TEXT, risk TEXT, legal_cleared INTEGER);
CREATE TABLE IF NOT EXISTS returned (key TEXT PRIMARY KEY, contract_id TEXT, to_addr TEXT, reasons TEXT);
"""


def _seed(conn: sqlite3.Connection) -> None:
    contracts = load_json(DATA / "contracts.json")
    insert_rows(conn, "contracts", [{**c, "data": json.dumps(c)} for c in contracts])
    for table in ("vendors", "benchmarks", "signatories"):
        insert_rows(conn, table, load_json(DATA / f"{table}.json"))


SANDBOX = SandboxDB("clm", _SCHEMA, _seed)


# --- tools ------------------------------------------------------------------------------


def get_contract(payload: dict[str, Any]) -> dict[str, Any]:
    """The contract and any other contract with the same vendor, title and value (duplicates)."""
    contract_id = str(payload.get("contract_id") or "")
    with SANDBOX.session() as conn:
        row = conn.execute(
            "SELECT data, status FROM contracts WHERE contract_id = ?", (contract_id,)
        ).fetchone()
        if row is None:
            return {"found": False, "contract_id": contract_id}
        contract = {**json.loads(row["data"]), "status": row["status"]}
        same = []
        for other in conn.execute(
            "SELECT data, status FROM contracts WHERE contract_id != ?", (contract_id,)
        ):
            data = json.loads(other["data"])
            if (data.get("counterparty"), data.get("title"), data.get("value_cents")) == (
                contract.get("counterparty"),
                contract.get("title"),
                contract.get("value_cents"),
            ):
                same.append({"contract_id": data["contract_id"], "status": other["status"]})
    return {"found": True, "contract": contract, "same_terms": same}


def screen_counterparty(payload: dict[str, Any]) -> dict[str, Any]:
    """The vendor master record: country, risk rating, sanctions flag and bank account on file."""
    with SANDBOX.session() as conn:
        row = conn.execute("SELECT * FROM vendors WHERE name = ?", (payload.get("name"),)).fetchone()
    if row is None:
        return {"known": False, "name": payload.get("name")}
    return {"known": True, **dict(row), "sanctioned": bool(row["sanctioned"])}


def price_benchmark(payload: dict[str, Any]) -> dict[str, Any]:
    with SANDBOX.session() as conn:
        row = conn.execute(
            "SELECT * FROM benchmarks WHERE category = ?", (payload.get("category"),)
        ).fetchone()
    return dict(row) if row else {}


def find_signatory(payload: dict[str, Any]) -> dict[str, Any]:
    """Delegation of authority: the department head if within their limit, else the CFO, else the CEO."""
    value = int(payload.get("value_cents") or 0)
    with SANDBOX.session() as conn:
        rows = [dict(r) for r in conn.execute("SELECT * FROM signatories ORDER BY limit_cents")]
    for row in rows:
        if row["department"] in (payload.get("department"), "*") and row["limit_cents"] >= value:
            return row
    return rows[-1]


def route_for_signature(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    with SANDBOX.session() as conn:
        conn.execute(
            "INSERT OR IGNORE INTO signature_queue VALUES (?, ?, ?, ?, ?)",
            (
                ctx.idempotency_key,
                payload["contract_id"],
                payload["signatory"],
                payload["risk"],
                int(bool(payload.get("legal_cleared"))),
            ),
        )
        conn.execute(
            "UPDATE contracts SET status = 'awaiting_signature' WHERE contract_id = ?",
            (payload["contract_id"],),
        )
    return {"queued_for": payload["signatory"], "contract_id": payload["contract_id"]}


def return_contract(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    with SANDBOX.session() as conn:
        conn.execute(
            "INSERT OR IGNORE INTO returned VALUES (?, ?, ?, ?)",
            (
                ctx.idempotency_key,
                payload["contract_id"],
                payload.get("to", ""),
                json.dumps(payload.get("reasons")),
            ),
        )
        conn.execute(
            "UPDATE contracts SET status = 'returned' WHERE contract_id = ?", (payload["contract_id"],)
        )
    return {"returned_to": payload.get("to"), "contract_id": payload["contract_id"]}


# --- agents -----------------------------------------------------------------------------


def _finding(area: str, code: str, severity: str, issue: str, fix: str) -> dict[str, str]:
    return {"area": area, "code": code, "severity": severity, "issue": issue, "recommendation": fix}


async def _tool(ctx: Any, name: str, args: dict[str, Any], why: str) -> dict[str, Any]:
    """A read through the governed gateway (or directly when the engine runs ungoverned)."""
    if getattr(ctx, "gate", None) is None:
        local = {"screen_counterparty": screen_counterparty, "price_benchmark": price_benchmark}[name]
        return local(args)
    result = await ctx.call_tool(name, args, reasoning=why)
    output = result.get("output") if result.get("status") == "ok" else None
    return output if isinstance(output, dict) else {}


def _clause(contract: dict[str, Any], heading: str) -> str | None:
    for text in contract.get("clauses") or []:
        if str(text).lower().startswith(heading.lower()):
            return str(text)
    return None


def review_commercial(payload: dict[str, Any]) -> dict[str, Any]:
    """Commercial terms: renewal, termination, liability, payment, price escalation, duration."""
    c = (payload.get("record") or {}).get("contract") or {}
    findings = []
    if c.get("auto_renew") and int(c.get("renewal_notice_days") or 0) > MAX_RENEWAL_NOTICE_DAYS:
        findings.append(
            _finding(
                "commercial",
                "auto_renewal",
                "medium",
                f"renews automatically unless cancelled {c['renewal_notice_days']} days ahead",
                f"cut the notice period to {MAX_RENEWAL_NOTICE_DAYS} days or remove auto-renewal",
            )
        )
    if c.get("category") != "nda" and not _clause(c, "Termination for convenience"):
        findings.append(
            _finding(
                "commercial",
                "no_termination_for_convenience",
                "medium",
                "we cannot leave the contract early",
                "add termination for convenience on 60-90 days' notice",
            )
        )
    cap = c.get("liability_cap")
    if c.get("category") != "nda" and not cap:
        findings.append(
            _finding(
                "commercial", "liability_cap_missing", "medium", "no liability cap", "cap at 12 months' fees"
            )
        )
    elif cap == "unlimited":
        findings.append(
            _finding(
                "commercial",
                "liability_cap_unlimited",
                "medium",
                "our liability is unlimited",
                "cap mutual liability at 12 months' fees",
            )
        )
    payment = _clause(c, "Payment")
    stated = c.get("payment_days")
    if (
        payment
        and stated
        and (m := re.search(r"within (\d+) days", payment))
        and int(m.group(1)) != int(stated)
    ):
        findings.append(
            _finding(
                "commercial",
                "payment_terms_conflict",
                "medium",
                f"the cover sheet says {stated} days, the payment clause {m.group(1)} days",
                "make the clause match the agreed terms",
            )
        )
    if int(c.get("price_increase_pct") or 0) > MAX_PRICE_INCREASE_PCT:
        findings.append(
            _finding(
                "commercial",
                "price_escalation",
                "medium",
                f"prices may rise {c['price_increase_pct']}% a year",
                f"cap increases at {MAX_PRICE_INCREASE_PCT}% or CPI",
            )
        )
    if int(c.get("term_months") or 0) > MAX_TERM_MONTHS:
        findings.append(
            _finding(
                "commercial",
                "long_term",
                "medium",
                f"a {c['term_months']}-month commitment",
                f"limit the initial term to {MAX_TERM_MONTHS} months",
            )
        )
    return {"area": "commercial", "findings": findings, "mode": MODE}


async def review_regulatory(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Regulatory clauses: sanctions, data protection, transfers, anti-bribery, law, bank details."""
    record = payload.get("record") or {}
    c = record.get("contract") or {}
    findings = []
    vendor = await _tool(
        ctx, "screen_counterparty", {"name": c.get("counterparty")}, "sanctions and vendor-master screening"
    )
    if not vendor.get("known"):
        findings.append(
            _finding(
                "regulatory",
                "unknown_counterparty",
                "medium",
                f"{c.get('counterparty')} is not in the vendor master (not screened)",
                "run vendor onboarding and sanctions screening before signing",
            )
        )
    elif vendor.get("sanctioned"):
        findings.append(
            _finding(
                "regulatory",
                "sanctioned_counterparty",
                "critical",
                f"{vendor['name']} is on the sanctions list",
                "do not contract; inform compliance",
            )
        )
    if vendor.get("known") and c.get("bank_account") and c["bank_account"] != vendor.get("bank_account"):
        findings.append(
            _finding(
                "regulatory",
                "bank_details_mismatch",
                "high",
                "the bank account in the contract differs from the vendor master",
                "confirm the account by calling the vendor on a known number (payment-fraud check)",
            )
        )
    if c.get("personal_data") and not c.get("dpa_attached"):
        findings.append(
            _finding(
                "regulatory",
                "dpa_missing",
                "high",
                "personal data is processed without a data processing agreement",
                "attach the standard DPA (GDPR art. 28)",
            )
        )
    clauses = " ".join(c.get("clauses") or []).lower()
    if (
        c.get("personal_data")
        and vendor.get("known")
        and vendor.get("country") not in ADEQUATE
        and "standard contractual clauses" not in clauses
    ):
        findings.append(
            _finding(
                "regulatory",
                "international_transfer",
                "high",
                f"personal data goes to {vendor.get('country')} without transfer safeguards",
                "add the EU standard contractual clauses and a transfer impact assessment",
            )
        )
    if vendor.get("risk_rating") == "high" and "bribery" not in clauses and "corruption" not in clauses:
        findings.append(
            _finding(
                "regulatory",
                "anti_bribery_missing",
                "medium",
                "a high-risk vendor without an anti-bribery clause",
                "add the anti-bribery and corruption clause",
            )
        )
    law = c.get("governing_law")
    if not law:
        findings.append(
            _finding("regulatory", "governing_law_missing", "medium", "no governing law", "add English law")
        )
    elif law not in APPROVED_LAW:
        findings.append(
            _finding(
                "regulatory",
                "governing_law_not_approved",
                "medium",
                f"governed by the law of {law}",
                "use one of: " + ", ".join(APPROVED_LAW),
            )
        )
    same = [s for s in record.get("same_terms") or [] if s.get("status") in ("signed", "awaiting_signature")]
    if same:
        findings.append(
            _finding(
                "regulatory",
                "duplicate_contract",
                "critical",
                f"the same contract is already {same[0]['status']} as {same[0]['contract_id']}",
                "do not sign twice; amend the existing contract instead",
            )
        )
    return {"area": "regulatory", "findings": findings, "vendor": vendor, "mode": MODE}


async def review_pricing(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Pricing against the category benchmark (percentiles) and the arithmetic of the stated value."""
    c = (payload.get("record") or {}).get("contract") or {}
    findings = []
    if c.get("category") == "nda":
        return {"area": "pricing", "findings": [], "note": "no price to benchmark", "mode": MODE}
    bench = await _tool(ctx, "price_benchmark", {"category": c.get("category")}, "compare the unit price")
    price, qty, value = c.get("unit_price_cents"), c.get("quantity"), c.get("value_cents")
    if price is None or value is None:
        findings.append(
            _finding("pricing", "missing_price", "medium", "no unit price or contract value", "add the price")
        )
        return {"area": "pricing", "findings": findings, "benchmark": bench, "mode": MODE}
    ratio = None
    if bench:
        ratio = round(int(price) / int(bench["median_cents"]), 2)
        if ratio > 1.5:
            findings.append(
                _finding(
                    "pricing",
                    "far_above_market",
                    "high",
                    f"unit price is {ratio}x the market median for {c['category']}",
                    f"negotiate towards the median ({bench['median_cents']} cents per {bench['unit']})",
                )
            )
        elif int(price) > int(bench["p75_cents"]):
            findings.append(
                _finding(
                    "pricing",
                    "above_market",
                    "medium",
                    f"unit price is above the 75th percentile ({bench['p75_cents']} cents)",
                    "ask for a discount to at least the 75th percentile",
                )
            )
    else:
        findings.append(_finding("pricing", "no_benchmark", "low", "no benchmark for this category", "none"))
    if qty:
        months = 12 if "month" in str(c.get("unit") or "") else 1
        expected = int(price) * int(qty) * months
        if expected and abs(int(value) - expected) / expected > 0.05:
            findings.append(
                _finding(
                    "pricing",
                    "value_mismatch",
                    "medium",
                    f"stated value {value} differs from price x quantity ({expected})",
                    "correct the value or the order form",
                )
            )
    return {
        "area": "pricing",
        "findings": findings,
        "price_to_median": ratio,
        "benchmark": bench,
        "mode": MODE,
    }


def merge_report(payload: dict[str, Any]) -> dict[str, Any]:
    """One report from the three reviews: overall risk, what legal must look at, the recommendation."""
    reviews = payload.get("reviews") or {}
    findings = [f for r in reviews.values() if isinstance(r, dict) for f in r.get("findings") or []]
    findings.sort(key=lambda f: -SEVERITY[f["severity"]])
    risk = findings[0]["severity"] if findings else "none"
    flagged = [f for f in findings if SEVERITY[f["severity"]] >= SEVERITY["medium"]]
    blocked = [f for f in findings if f["severity"] == "critical"]
    contract = (payload.get("record") or {}).get("contract") or {}
    lines = [
        f"Contract {contract.get('contract_id')} with {contract.get('counterparty')}: overall risk {risk}."
    ]
    lines += [f"- [{f['severity']}] {f['area']}: {f['issue']} -> {f['recommendation']}" for f in findings]
    return {
        "risk": risk,
        "blocked": bool(blocked),
        "needs_legal": bool(flagged) and not blocked,
        "flags": [f["code"] for f in findings],
        "flagged": flagged,
        "summary": "\n".join(lines),
        "recommendation": "reject" if blocked else ("legal_review" if flagged else "sign"),
        "mode": MODE,
    }
