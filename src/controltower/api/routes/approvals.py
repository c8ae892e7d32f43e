"""The approvals inbox: governed tool calls waiting for a human, and approval steps of runs.

Two kinds share one inbox. ``tool`` approvals (id ``apr_...``) come from the gateway: a
decision is bound to the exact arguments (an edit re-validates them against the tool's
schema and policy). ``step`` approvals (id ``step:<run>:<step key>``) are approval steps of
a workflow; they take approve or reject. Either way the approver's role and group are
checked, and the decision wakes the run.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, Field
from sqlalchemy.engine import Connection

from controltower.api.deps import Services, require, services
from controltower.api.pagination import MAX_LIMIT, Page, cursor_of, encode_cursor
from controltower.api.problems import PROBLEM_RESPONSES
from controltower.auth import PermissionDeniedError, Principal
from controltower.gateway.approvals import ApprovalBook, ApprovalRequest, Approver, _request
from controltower.spec.errors import InvalidInputError, NotFoundError
from controltower.store import tables as t

router = APIRouter(prefix="/v1", tags=["approvals"], responses=PROBLEM_RESPONSES)

Svc = Annotated[Services, Depends(services)]
ApprovalId = Annotated[str, Path(min_length=1, max_length=600)]
Status = Literal["pending", "approved", "rejected", "expired"]


class ApprovalOut(BaseModel):
    id: str
    kind: Literal["tool", "step"]
    status: str
    run_id: str | None = None
    step_key: str | None = None
    workflow: str | None = None
    agent: str | None = None
    tool: str | None = None
    tool_version: str | None = None
    args: dict[str, Any] | None = None
    digest: str | None = None
    context: dict[str, Any] = Field(default_factory=dict)
    prompt: str | None = None
    input: Any = None
    risk: str | None = None
    group: str | None = None
    may_decide: bool = False
    decided_by: str | None = None
    decided_role: str | None = None
    reason: str | None = None
    approved_args: dict[str, Any] | None = None
    escalations: int = 0
    due_at: float | None = None
    created_at: float
    decided_at: float | None = None


class Decision(BaseModel):
    reason: str | None = Field(default=None, max_length=4000)


class ApproveBody(Decision):
    args: dict[str, Any] | None = Field(
        default=None, description="Edited arguments (tool approvals only); re-validated and re-checked."
    )


class EditBody(Decision):
    args: dict[str, Any]


def _tool_out(req: ApprovalRequest, principal: Principal) -> ApprovalOut:
    return ApprovalOut(
        id=req.id,
        kind="tool",
        status=req.status,
        run_id=req.run_id,
        step_key=req.step_key,
        workflow=req.workflow,
        agent=req.agent,
        tool=req.tool,
        tool_version=req.tool_version,
        args=req.args,
        digest=req.digest,
        context=req.context,
        risk=req.risk,
        group=req.approval_group,
        may_decide=req.status == "pending" and _may_decide(principal, req.approval_group),
        decided_by=req.decided_by,
        decided_role=req.decided_role,
        reason=req.reason,
        approved_args=req.approved_args,
        escalations=req.escalations,
        due_at=req.due_at,
        created_at=req.created_at,
        decided_at=req.decided_at,
    )


def _step_out(row: Any, principal: Principal) -> ApprovalOut:
    detail = json.loads(row.detail) if row.detail else {}
    group = detail.get("group") if isinstance(detail, dict) else None
    shown = json.loads(row.input) if row.input else None
    return ApprovalOut(
        id=f"step:{row.run_id}:{row.step_key}",
        kind="step",
        status="pending",
        run_id=row.run_id,
        step_key=row.step_key,
        workflow=row.workflow,
        prompt=detail.get("prompt") if isinstance(detail, dict) else None,
        input=shown if not (isinstance(shown, dict) and "$payload" in shown) else None,
        group=group,
        may_decide=_may_decide(principal, group),
        created_at=row.started_at,
    )


def _may_decide(principal: Principal, group: str | None) -> bool:
    return principal.can("approvals:decide") and principal.in_group(group)


def _approver(principal: Principal) -> Approver:
    role = next((r for r in ("admin", "approver", "operator") if r in principal.roles), "viewer")
    return Approver(principal.subject, role, tuple(sorted(principal.groups)))


def _step_query(tenant: str) -> sa.Select[Any]:
    s, r = t.steps.c, t.runs.c
    return (
        sa.select(s.run_id, s.step_key, s.input, s.detail, s.started_at, r.workflow)
        .select_from(t.steps.join(t.runs, t.runs.c.id == t.steps.c.run_id))
        .where(
            r.tenant == tenant,
            s.kind == "approval",
            s.status == "waiting",
            r.status.not_in(["completed", "failed", "cancelled"]),
        )
    )


@router.get("/approvals", summary="The approvals inbox of the caller's tenant, oldest first")
async def inbox(
    svc: Svc,
    principal: Annotated[Principal, Depends(require("approvals:read"))],
    status: Status = "pending",
    kind: Literal["tool", "step"] | None = None,
    run_id: Annotated[str | None, Query(max_length=40)] = None,
    mine: Annotated[bool, Query(description="Only those the caller may decide")] = False,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: str | None = None,
) -> Page[ApprovalOut]:
    after = cursor_of(cursor, list)
    if after is not None and (
        len(after) != 2 or not isinstance(after[0], int | float) or not isinstance(after[1], str)
    ):
        raise InvalidInputError("invalid cursor", hint="pass the next_cursor of the previous page unchanged")
    tenant = principal.tenant

    def fn(conn: Connection) -> list[ApprovalOut]:
        found: list[ApprovalOut] = []
        if kind in (None, "tool"):
            a = t.approvals.c
            query = sa.select(t.approvals).where(a.tenant == tenant, a.status == status)
            if run_id is not None:
                query = query.where(a.run_id == run_id)
            if after is not None:
                query = query.where(
                    sa.or_(a.created_at > after[0], sa.and_(a.created_at == after[0], a.id > after[1]))
                )
            rows = conn.execute(query.order_by(a.created_at, a.id).limit(limit + 1))
            found += [_tool_out(_request(row), principal) for row in rows]
        if kind in (None, "step") and status == "pending":
            query = _step_query(tenant)
            if run_id is not None:
                query = query.where(t.steps.c.run_id == run_id)
            if after is not None:
                query = query.where(t.steps.c.started_at >= after[0])
            rows = conn.execute(query.order_by(t.steps.c.started_at, t.steps.c.run_id).limit(limit + 1 + 50))
            steps = [_step_out(row, principal) for row in rows]
            if after is not None:
                steps = [x for x in steps if (x.created_at, x.id) > (after[0], after[1])]
            found += steps
        found.sort(key=lambda x: (x.created_at, x.id))
        return found

    found = await svc.store.run(fn)
    page = found[:limit]
    nxt = encode_cursor([page[-1].created_at, page[-1].id]) if len(found) > limit else None
    if mine:
        page = [x for x in page if x.may_decide]
    return Page[ApprovalOut](items=page, next_cursor=nxt)


async def _find(svc: Services, principal: Principal, approval_id: str) -> ApprovalOut:
    if approval_id.startswith("step:"):
        _, _, rest = approval_id.partition(":")
        run_id, _, step_key = rest.partition(":")

        def fn(conn: Connection) -> Any:
            query = _step_query(principal.tenant).where(
                t.steps.c.run_id == run_id, t.steps.c.step_key == step_key
            )
            return conn.execute(query).first()

        row = await svc.store.run(fn) if run_id and step_key else None
        if row is None:
            raise NotFoundError(
                f"no pending approval {approval_id!r}", hint="list them with GET /v1/approvals"
            )
        return _step_out(row, principal)
    book = svc.gateway.approvals if svc.gateway is not None else ApprovalBook(svc.store)
    return _tool_out(await book.get(approval_id, tenant=principal.tenant), principal)


@router.get("/approvals/{approval_id}", summary="One approval: the whole picture")
async def approval_detail(
    approval_id: ApprovalId, svc: Svc, principal: Annotated[Principal, Depends(require("approvals:read"))]
) -> ApprovalOut:
    return await _find(svc, principal, approval_id)


async def _decide(
    svc: Services,
    principal: Principal,
    approval_id: str,
    *,
    approve: bool,
    reason: str | None,
    args: dict[str, Any] | None,
) -> ApprovalOut:
    found = await _find(svc, principal, approval_id)
    if not principal.in_group(found.group):
        raise PermissionDeniedError(
            f"{principal.subject} may not decide approval {approval_id}: it needs group {found.group!r}",
            hint="ask an admin to add you to the group",
        )
    if found.kind == "step":
        if args is not None:
            raise InvalidInputError("an approval step has no arguments to edit", hint="approve or reject it")
        assert found.run_id is not None
        assert found.step_key is not None
        await svc.engine.decide(
            found.run_id, found.step_key, approved=approve, by=principal.subject, comment=reason
        )
        return found.model_copy(
            update={
                "status": "approved" if approve else "rejected",
                "decided_by": principal.subject,
                "reason": reason,
                "may_decide": False,
            }
        )
    if svc.gateway is not None:
        decided = await svc.gateway.decide(
            approval_id,
            approver=_approver(principal),
            approve=approve,
            reason=reason,
            edited_args=args,
            tenant=principal.tenant,
        )
    else:
        if args is not None:
            raise InvalidInputError("editing needs the tool gateway, which this server does not run")
        decided = await ApprovalBook(svc.store).decide(
            approval_id,
            approver=_approver(principal),
            approve=approve,
            reason=reason,
            tenant=principal.tenant,
        )
    if decided.run_id is not None:
        await svc.engine.wake(decided.run_id)
    return _tool_out(decided, principal)


@router.post("/approvals/{approval_id}/approve", summary="Approve (optionally with edited arguments)")
async def approve(
    approval_id: ApprovalId,
    svc: Svc,
    principal: Annotated[Principal, Depends(require("approvals:decide"))],
    body: ApproveBody | None = None,
) -> ApprovalOut:
    body = body or ApproveBody()
    return await _decide(svc, principal, approval_id, approve=True, reason=body.reason, args=body.args)


@router.post("/approvals/{approval_id}/edit", summary="Approve with edited arguments")
async def edit(
    approval_id: ApprovalId,
    body: EditBody,
    svc: Svc,
    principal: Annotated[Principal, Depends(require("approvals:decide"))],
) -> ApprovalOut:
    return await _decide(svc, principal, approval_id, approve=True, reason=body.reason, args=body.args)


@router.post("/approvals/{approval_id}/reject", summary="Reject (a reason is required)")
async def reject(
    approval_id: ApprovalId,
    body: Decision,
    svc: Svc,
    principal: Annotated[Principal, Depends(require("approvals:decide"))],
) -> ApprovalOut:
    if not (body.reason or "").strip():
        raise InvalidInputError("a rejection needs a reason", hint='send {"reason": "why"}')
    return await _decide(svc, principal, approval_id, approve=False, reason=body.reason, args=None)
