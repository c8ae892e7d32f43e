"""Approval requests: whole picture stored, one decision wins, roles checked, consumed exactly once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from controltower.gateway.approvals import ApprovalBook, Approver, NotAllowedToApprove
from controltower.gateway.autonomy import is_tightening, stricter, tighten
from controltower.gateway.calls import CallLog
from controltower.gateway.tools import ToolDefinition, args_digest
from controltower.spec.errors import ConflictError, InvalidInputError
from controltower.store import SqlStore

FIN = Approver("fiona", "approver", ("finance",))


async def ask(book: ApprovalBook, key: str = "acme/run1/pay/0", **over: Any) -> Any:
    fields: dict[str, Any] = {
        "tenant": "acme",
        "call_key": key,
        "tool": "erp.pay_invoice",
        "tool_version": "1",
        "args": {"invoice": "INV-7", "amount_cents": 125_000},
        "risk": "high",
        "group": "finance",
        "context": {"proposal": {"reasoning": "PO and delivery note match"}},
    }
    fields.update(over)
    return await book.request(**fields)


async def test_request_is_idempotent_per_call_and_keeps_the_picture(store: SqlStore) -> None:
    book = ApprovalBook(store)
    first, created = await ask(book)
    again, created_again = await ask(book)
    assert created
    assert not created_again
    assert again.id == first.id
    assert first.digest == args_digest("erp.pay_invoice", "1", {"invoice": "INV-7", "amount_cents": 125_000})
    assert first.context["proposal"]["reasoning"] == "PO and delivery note match"
    assert [a.id for a in await book.list(tenant="acme")] == [first.id]
    assert await book.list(tenant="globex") == []


async def test_roles_and_groups_are_checked(store: SqlStore) -> None:
    book = ApprovalBook(store)
    req, _ = await ask(book)
    for who in (
        Approver("sam", "approver", ("support",)),
        Approver("vic", "viewer", ("finance",)),
    ):
        with pytest.raises(NotAllowedToApprove):
            await book.decide(req.id, approver=who, approve=True)
    with pytest.raises(InvalidInputError):
        await book.decide(req.id, approver=FIN, approve=False)  # a rejection needs a reason
    assert (await book.get(req.id)).status == "pending"
    done = await book.decide(req.id, approver=Approver("ada", "admin"), approve=True)
    assert done.status == "approved"
    assert done.decided_by == "ada"


async def test_first_decision_wins_under_concurrency(store: SqlStore) -> None:
    book = ApprovalBook(store)
    req, _ = await ask(book)
    outcomes = await asyncio.gather(
        book.decide(req.id, approver=FIN, approve=True),
        book.decide(req.id, approver=FIN, approve=False, reason="no"),
        return_exceptions=True,
    )
    assert sum(isinstance(o, ConflictError) for o in outcomes) == 1


async def test_edit_rebinds_the_digest_and_is_checked(store: SqlStore) -> None:
    book = ApprovalBook(store)
    req, _ = await ask(book)

    async def check(_req: Any, args: dict[str, Any]) -> None:
        if args["amount_cents"] > 200_000:
            raise InvalidInputError("amount above the approver's limit")

    with pytest.raises(InvalidInputError):
        await book.decide(
            req.id,
            approver=FIN,
            approve=True,
            edited_args={"invoice": "INV-7", "amount_cents": 999_999},
            check_edit=check,
        )
    edited = {"invoice": "INV-7", "amount_cents": 100_000}
    done = await book.decide(req.id, approver=FIN, approve=True, edited_args=edited, check_edit=check)
    assert done.edited
    assert done.approved_args == edited
    assert done.approved_digest == args_digest("erp.pay_invoice", "1", edited)
    # the approval authorises the edited digest only, once
    assert not await book.consume(req.call_key, req.digest)
    assert await book.consume(req.call_key, done.approved_digest)
    assert not await book.consume(req.call_key, done.approved_digest)


async def test_claim_consumes_the_approval_once_and_detects_in_doubt(store: SqlStore) -> None:
    book, calls = ApprovalBook(store), CallLog(store)
    req, _ = await ask(book)
    done = await book.decide(req.id, approver=FIN, approve=True)
    assert done.approved_digest is not None
    common: dict[str, Any] = {
        "tenant": "acme",
        "tool": "erp.pay_invoice",
        "version": "1",
        "digest": req.digest,
        "run_id": "run1",
        "step_key": "pay",
        "approval": (req.call_key, done.approved_digest),
    }
    first = await calls.claim(req.call_key, retry_in_doubt=False, **common)
    assert first.outcome == "claimed"
    # a crash before the result was recorded: the write is in doubt, never re-run by itself
    assert (await calls.claim(req.call_key, retry_in_doubt=False, **common)).outcome == "in_doubt"
    await calls.complete(req.call_key, {"paid": True})
    replay = await calls.claim(req.call_key, retry_in_doubt=False, **common)
    assert replay.outcome == "completed"
    assert replay.record is not None
    assert replay.record.result == {"paid": True}
    other = dict(common, digest="0" * 64)
    assert (await calls.claim(req.call_key, retry_in_doubt=False, **other)).outcome == "digest_mismatch"
    # another call cannot ride on this approval
    stolen = await calls.claim("acme/run1/pay/1", retry_in_doubt=False, **common)
    assert stolen.outcome == "approval_used"


def test_autonomy_levels_only_tighten() -> None:
    write = ToolDefinition(name="crm.update", side_effect="write", risk="low")
    risky = ToolDefinition(name="crm.merge", side_effect="write", risk="high")
    pay = ToolDefinition(name="erp.pay", side_effect="irreversible", risk="low")
    read = ToolDefinition(name="crm.get")
    assert tighten("allow", read, "draft_only") == ("allow", None)
    assert tighten("allow", write, "draft_only")[0] == "draft"
    assert tighten("allow", write, "approve_writes")[0] == "require_approval"
    assert tighten("allow", write, "autonomous_low_risk")[0] == "allow"
    assert tighten("allow", risky, "autonomous_low_risk")[0] == "require_approval"
    assert tighten("allow", risky, "autonomous_low_risk", risk_threshold="high")[0] == "allow"
    assert tighten("allow", pay, "autonomous_low_risk")[0] == "require_approval"
    assert tighten("allow", pay, "expanded")[0] == "allow"
    for level in ("draft_only", "approve_writes", "autonomous_low_risk", "expanded"):
        assert tighten("deny", write, level)[0] == "deny"
        assert tighten("require_approval", write, level)[0] in ("require_approval", "draft")
    assert stricter("expanded", "approve_writes") == "approve_writes"
    assert is_tightening("expanded", "draft_only")
    assert not is_tightening("draft_only", "expanded")
