"""Offline agents and sandbox tools for the invoice-matching template.

The sandbox "ERP" is a SQLite file at ``$TOWER_HOME/sandbox/erp.sqlite`` (TOWER_HOME defaults to
``.tower``), created and seeded from ``data/`` on first use: vendors with their bank accounts,
purchase orders with lines, delivery notes, departments with their managers, and invoices
already processed (for duplicate detection). Amounts are integer cents.

Payments are irreversible: ``schedule_payment`` is only ever called by the payer agent through
the gateway, where a Cedar ``@approval`` policy makes treasury approve every single one.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

from controltower.sandbox import SandboxDB, insert_rows, load_json

DATA = Path(__file__).resolve().parent / "data"
PRICE_TOLERANCE = 0.02  # unit prices may differ from the PO by up to 2 %
TIERS = ((1_000_000, "department-managers"), (10_000_000, "finance-directors"))  # else cfo-office
FRAUD_SIGNALS = frozenset({"duplicate_invoice", "bank_change", "vendor_blocked", "unknown_vendor"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vendors (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, iban TEXT NOT NULL, status TEXT NOT NULL, country TEXT);
CREATE TABLE IF NOT EXISTS departments (id TEXT PRIMARY KEY, manager TEXT NOT NULL, email TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS purchase_orders (
  po_number TEXT PRIMARY KEY, vendor_id TEXT NOT NULL, department TEXT NOT NULL, currency TEXT NOT NULL,
  status TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS po_lines (
  po_number TEXT NOT NULL, sku TEXT NOT NULL, qty INTEGER NOT NULL, unit_price_cents INTEGER NOT NULL,
  PRIMARY KEY (po_number, sku));
CREATE TABLE IF NOT EXISTS delivery_notes (
  dn_id TEXT NOT NULL, po_number TEXT NOT NULL, sku TEXT NOT NULL, qty_received INTEGER NOT NULL,
  PRIMARY KEY (dn_id, sku));
CREATE TABLE IF NOT EXISTS invoices (
  vendor_id TEXT NOT NULL, invoice_number TEXT NOT NULL, invoice_id TEXT NOT NULL, status TEXT NOT NULL,
  total_cents INTEGER, updated_at REAL NOT NULL, PRIMARY KEY (vendor_id, invoice_number));
CREATE TABLE IF NOT EXISTS exceptions (
  key TEXT PRIMARY KEY, invoice_id TEXT NOT NULL, queue TEXT NOT NULL, reasons TEXT NOT NULL,
  created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS payments (
  key TEXT PRIMARY KEY, invoice_id TEXT NOT NULL, vendor_id TEXT NOT NULL, amount_cents INTEGER NOT NULL,
  currency TEXT NOT NULL, iban TEXT NOT NULL, scheduled_at REAL NOT NULL);
"""


def _seed(conn: sqlite3.Connection) -> None:
    data = load_json(DATA / "erp.json")
    for table in ("vendors", "departments", "purchase_orders"):
        insert_rows(conn, table, data[table])
    orders = data["purchase_orders"]
    insert_rows(
        conn, "po_lines", [{**line, "po_number": po["po_number"]} for po in orders for line in po["lines"]]
    )
    received = [
        {"dn_id": dn["dn_id"], "po_number": po["po_number"], "sku": sku, "qty_received": qty}
        for po in orders
        for dn in po.get("deliveries", [])
        for sku, qty in dn["received"].items()
    ]
    insert_rows(conn, "delivery_notes", received)
    now = time.time()
    insert_rows(conn, "invoices", [{**invoice, "updated_at": now} for invoice in data["processed_invoices"]])


SANDBOX = SandboxDB("erp", _SCHEMA, _seed, autocommit=True)


# -- tools (called through the governed gateway) ---------------------------------------------


def erp_lookup(payload: dict[str, Any]) -> dict[str, Any]:
    """Vendor master, purchase order with lines, deliveries and earlier invoices for one invoice."""
    with SANDBOX.session() as conn:
        vendor = None
        if payload.get("vendor_id"):
            vendor = conn.execute("SELECT * FROM vendors WHERE id = ?", (payload["vendor_id"],)).fetchone()
        if vendor is None and payload.get("vendor_name"):
            vendor = conn.execute(
                "SELECT * FROM vendors WHERE lower(name) = lower(?)", (str(payload["vendor_name"]).strip(),)
            ).fetchone()
        po = None
        lines: list[dict[str, Any]] = []
        received: dict[str, int] = {}
        department = None
        if payload.get("po_number"):
            po = conn.execute(
                "SELECT * FROM purchase_orders WHERE po_number = ?", (payload["po_number"],)
            ).fetchone()
        if po is not None:
            lines = [
                dict(r)
                for r in conn.execute(
                    "SELECT sku, qty, unit_price_cents FROM po_lines WHERE po_number = ?", (po["po_number"],)
                )
            ]
            for row in conn.execute(
                "SELECT sku, sum(qty_received) AS qty FROM delivery_notes WHERE po_number = ? GROUP BY sku",
                (po["po_number"],),
            ):
                received[row["sku"]] = int(row["qty"])
            dept = conn.execute("SELECT * FROM departments WHERE id = ?", (po["department"],)).fetchone()
            department = dict(dept) if dept is not None else None
        earlier = None
        if vendor is not None and payload.get("invoice_number"):
            row = conn.execute(
                "SELECT invoice_id, status FROM invoices "
                "WHERE vendor_id = ? AND lower(invoice_number) = lower(?)",
                (vendor["id"], str(payload["invoice_number"]).strip()),
            ).fetchone()
            earlier = dict(row) if row is not None else None
    return {
        "vendor": dict(vendor) if vendor is not None else None,
        "po": dict(po) if po is not None else None,
        "po_lines": lines,
        "received": received,
        "department": department,
        "earlier_invoice": earlier,
    }


def flag_exception(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Put the invoice in an AP exception queue (fraud review or discrepancies) with the reasons."""
    with SANDBOX.session() as conn:
        conn.execute(
            "INSERT OR IGNORE INTO exceptions VALUES (?, ?, ?, ?, ?)",
            (
                ctx.idempotency_key,
                payload["invoice_id"],
                payload["queue"],
                json.dumps(payload.get("reasons", [])),
                time.time(),
            ),
        )
    return {"queued": True, "queue": payload["queue"]}


def record_invoice(payload: dict[str, Any]) -> dict[str, Any]:
    """Remember the invoice (vendor + number) and its outcome: the next copy is a duplicate."""
    vendor = payload.get("vendor_id")
    number = payload.get("invoice_number")
    if vendor and number:
        with SANDBOX.session() as conn:
            conn.execute(
                "INSERT INTO invoices VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (vendor_id, invoice_number) DO NOTHING",
                (
                    vendor,
                    str(number).strip(),
                    payload["invoice_id"],
                    payload["status"],
                    payload.get("total_cents"),
                    time.time(),
                ),
            )
    return {"invoice_id": payload["invoice_id"], "status": payload["status"]}


def schedule_payment(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Schedule the bank transfer (irreversible). Idempotent on the call's key."""
    with SANDBOX.session() as conn:
        vendor = conn.execute("SELECT iban FROM vendors WHERE id = ?", (payload["vendor_id"],)).fetchone()
        if vendor is None or vendor["iban"] != payload["iban"]:
            raise ValueError("the IBAN does not match the vendor master record; payment refused")
        done = conn.execute(
            "INSERT OR IGNORE INTO payments VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                ctx.idempotency_key,
                payload["invoice_id"],
                payload["vendor_id"],
                payload["amount_cents"],
                payload["currency"],
                payload["iban"],
                time.time(),
            ),
        ).rowcount
    return {"scheduled": True, "duplicate": done == 0, "payment_ref": ctx.idempotency_key[-12:]}


# -- agents (offline heuristics; same contract as the LLM agents) -----------------------------


def classify_document(payload: dict[str, Any]) -> dict[str, Any]:
    """Invoice, credit note, statement or reminder, from the stated type, the title and the sign."""
    stated = str(payload.get("document_type") or "").lower()
    title = str(payload.get("title") or "").lower()
    total = payload.get("total_cents")
    if stated in ("invoice", "credit_note", "statement", "reminder"):
        kind = stated
    elif re.search(r"credit\s*note|gutschrift", title) or (isinstance(total, int) and total < 0):
        kind = "credit_note"
    elif re.search(r"statement|kontoauszug", title):
        kind = "statement"
    elif re.search(r"reminder|mahnung|overdue", title):
        kind = "reminder"
    else:
        kind = "invoice"
    return {"document_type": kind, "confidence": 0.95 if stated else 0.8, "offline": True}


def match_invoice(payload: dict[str, Any]) -> dict[str, Any]:
    """Three-way match (invoice, PO, delivery notes) and fraud signals; a recommendation and its approver."""
    inv = payload.get("invoice") or {}
    erp_view = payload.get("erp") or {}
    vendor = erp_view.get("vendor")
    po = erp_view.get("po")
    ordered = {line["sku"]: line for line in erp_view.get("po_lines") or []}
    received: dict[str, int] = erp_view.get("received") or {}
    signals: list[str] = []
    found: list[dict[str, Any]] = []

    def discrepancy(kind: str, detail: str) -> None:
        found.append({"type": kind, "detail": detail})

    if vendor is None:
        signals.append("unknown_vendor")
    else:
        if vendor["status"] == "blocked":
            signals.append("vendor_blocked")
        if inv.get("iban") and inv["iban"].replace(" ", "") != vendor["iban"]:
            signals.append("bank_change")
    if erp_view.get("earlier_invoice"):
        signals.append("duplicate_invoice")
    lines = inv.get("lines") or []
    total = int(inv.get("total_cents") or 0)
    if not lines:
        discrepancy("no_lines", "the invoice has no line items")
    computed = sum(int(line.get("qty") or 0) * int(line.get("unit_price_cents") or 0) for line in lines)
    if lines and abs(computed - total) > 1:
        discrepancy("total_mismatch", f"lines add up to {computed}, the invoice says {total}")
    if po is None:
        discrepancy(
            "no_po", f"no purchase order {inv.get('po_number')!r}" if inv.get("po_number") else "no PO number"
        )
    else:
        if vendor is not None and po["vendor_id"] != vendor["id"]:
            discrepancy("vendor_mismatch", f"PO {po['po_number']} belongs to vendor {po['vendor_id']}")
        if po["status"] != "open":
            discrepancy("po_closed", f"PO {po['po_number']} is {po['status']}")
        if inv.get("currency") and inv["currency"] != po["currency"]:
            discrepancy("currency_mismatch", f"invoice in {inv['currency']}, PO in {po['currency']}")
        for line in lines:
            sku = line.get("sku")
            want = ordered.get(sku)
            if want is None:
                discrepancy("unknown_item", f"{sku} is not on the PO")
                continue
            price, qty = int(line.get("unit_price_cents") or 0), int(line.get("qty") or 0)
            if abs(price - want["unit_price_cents"]) > PRICE_TOLERANCE * want["unit_price_cents"]:
                discrepancy("price_mismatch", f"{sku}: {price} vs PO {want['unit_price_cents']}")
            if qty > want["qty"]:
                discrepancy("qty_over_ordered", f"{sku}: {qty} invoiced, {want['qty']} ordered")
            got = received.get(str(sku), 0)
            if got == 0:
                discrepancy("not_delivered", f"{sku}: no delivery note")
            elif qty > got:
                discrepancy("qty_not_received", f"{sku}: {qty} invoiced, {got} received")
    group = next((g for limit, g in TIERS if total < limit), "cfo-office")
    if signals:
        recommendation = "fraud_review"
    elif found:
        recommendation = "hold"
    else:
        recommendation = "approve"
    department = erp_view.get("department") or {}
    return {
        "matched": not found and not signals,
        "discrepancies": found,
        "discrepancy_types": sorted({d["type"] for d in found}),
        "signals": sorted(set(signals)),
        "recommendation": recommendation,
        "approver_group": group,
        "manager": department.get("manager"),
        "department": department.get("id"),
        "offline": True,
    }


async def pay_invoice(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """The payer agent: asks the gateway to schedule the transfer; treasury approves each one."""
    args = {
        "invoice_id": payload["invoice_id"],
        "vendor_id": payload["vendor_id"],
        "amount_cents": int(payload["amount_cents"]),
        "currency": payload["currency"],
        "iban": payload["iban"],
        "iban_verified": payload["iban"] == payload.get("master_iban"),
    }
    result = await ctx.call_tool(
        "schedule_payment",
        args,
        reasoning=f"{payload.get('recommendation')} match; approved by {payload.get('approved_by')}",
        data_read=[f"erp:purchase_orders/{payload.get('po_number')}", f"erp:vendors/{payload['vendor_id']}"],
    )
    if result.get("status") == "ok":
        return {"paid": True, "outcome": "ok", "payment": result.get("output")}
    return {
        "paid": False,
        "outcome": result.get("code") or result.get("status"),
        "reason": result.get("reason"),
    }
