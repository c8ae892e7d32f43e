"""Tools, policies, audit and budgets of the caller's tenant."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from controltower.api.deps import Services, require, services
from controltower.api.pagination import MAX_LIMIT, Page, cursor_of, encode_cursor
from controltower.api.problems import PROBLEM_RESPONSES
from controltower.auth import Principal
from controltower.gateway.audit import AuditLog
from controltower.gateway.budgets import BudgetLedger
from controltower.gateway.policy import PolicyEngine, PolicyRequest
from controltower.gateway.registry import ToolRegistry, UnknownToolError
from controltower.gateway.tools import ToolDefinition
from controltower.spec.errors import InvalidInputError

router = APIRouter(prefix="/v1", tags=["governance"], responses=PROBLEM_RESPONSES)

Svc = Annotated[Services, Depends(services)]


class ToolOut(BaseModel):
    name: str
    version: str
    owner: str
    description: str
    side_effect: str
    risk: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    cost_micros: int
    deprecated: str | None
    source: str
    environments: list[str]
    tags: list[str]


class PolicyOut(BaseModel):
    id: str
    file: str
    line: int | None
    effect: str
    actions: list[str]
    any_action: bool
    approval: str | None
    note: str | None


class PolicyList(BaseModel):
    files: list[str]
    policies: list[PolicyOut]
    errors: list[str] = Field(default_factory=list)


class ExplainBody(BaseModel):
    tool: str = Field(min_length=1, max_length=200)
    version: str | None = Field(default=None, max_length=40)
    agent: str | None = Field(default=None, max_length=100)
    workflow: str | None = Field(default=None, max_length=100)
    department: str | None = Field(default=None, max_length=100)
    env: Literal["dev", "staging", "prod"] | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    cost_so_far_cents: int = Field(default=0, ge=0, le=10**12)


class Explanation(BaseModel):
    effect: str
    allowed: bool
    approval_group: str | None
    policy_ids: list[str]
    reason: str
    errors: list[str]
    explanation: str


class AuditOut(BaseModel):
    seq: int
    ts: float
    actor: str
    kind: str
    outcome: str
    subject: str | None
    run_id: str | None
    workflow: str | None
    reason: str | None
    inputs_digest: str | None
    data: dict[str, Any]
    prev_hash: str
    hash: str


class VerifyOut(BaseModel):
    """The chain check; the chain spans every tenant, so only this tenant's count is shown."""

    ok: bool
    checked: int
    first_bad_seq: int | None
    problem: str | None
    message: str


class BudgetOut(BaseModel):
    scope: str
    unit: str
    cap: int | None
    used: int
    reserved: int
    remaining: int | None


def _registry(svc: Services) -> ToolRegistry:
    return svc.gateway.registry if svc.gateway is not None else ToolRegistry(svc.store)


def _audit(svc: Services) -> AuditLog:
    return svc.gateway.audit if svc.gateway is not None else AuditLog(svc.store)


def _tool(x: ToolDefinition) -> ToolOut:
    return ToolOut(
        name=x.name,
        version=x.version,
        owner=x.owner,
        description=x.description,
        side_effect=x.side_effect,
        risk=x.risk,
        input_schema=x.input_schema,
        output_schema=x.output_schema,
        cost_micros=x.cost_micros,
        deprecated=x.deprecated,
        source=x.source,
        environments=sorted(x.environments),
        tags=list(x.tags),
    )


@router.get("/tools", summary="The tenant's tool registry, each tool at its newest version")
async def list_tools(
    svc: Svc,
    principal: Annotated[Principal, Depends(require("tools:read"))],
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: str | None = None,
) -> Page[ToolOut]:
    after = cursor_of(cursor, str)
    tools = sorted(await _registry(svc).latest(tenant=principal.tenant), key=lambda x: x.name)
    if after is not None:
        tools = [x for x in tools if x.name > after]
    page = tools[:limit]
    nxt = encode_cursor(page[-1].name) if len(tools) > limit else None
    return Page[ToolOut](items=[_tool(x) for x in page], next_cursor=nxt)


@router.get("/tools/{name}/versions", summary="Every version of one tool")
async def tool_versions(
    name: Annotated[str, Path(min_length=1, max_length=200)],
    svc: Svc,
    principal: Annotated[Principal, Depends(require("tools:read"))],
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: str | None = None,
) -> Page[ToolOut]:
    start = max(0, cursor_of(cursor, int) or 0)
    versions = await _registry(svc).versions(name, tenant=principal.tenant)
    if not versions:
        raise UnknownToolError(f"no tool {name!r}", hint="list tools with GET /v1/tools")
    page = versions[start : start + limit]  # oldest first; a version is never removed
    nxt = encode_cursor(start + limit) if len(versions) > start + limit else None
    return Page[ToolOut](items=[_tool(x) for x in page], next_cursor=nxt)


async def _policy_engine(svc: Services, tenant: str) -> PolicyEngine:
    gateway = svc.gateway
    if gateway is None:
        raise InvalidInputError("this server runs no tool gateway, so no policies are loaded")
    if gateway.policy is not None:
        return gateway.policy
    tools = await _registry(svc).latest(tenant=tenant)
    return PolicyEngine(gateway.policy_texts, tools)


@router.get("/policies", summary="The loaded policies: who may call what")
async def list_policies(
    svc: Svc, principal: Annotated[Principal, Depends(require("policies:read"))]
) -> PolicyList:
    gateway = svc.gateway
    if gateway is None:
        return PolicyList(files=[], policies=[])
    files = sorted(gateway.policy_texts)
    try:
        engine = await _policy_engine(svc, principal.tenant)
    except InvalidInputError as exc:
        return PolicyList(files=files, policies=[], errors=[exc.message])
    items = [
        PolicyOut(
            id=pid,
            file=info.file,
            line=info.line,
            effect=info.effect,
            actions=sorted(info.actions),
            any_action=info.any_action,
            approval=info.approval,
            note=info.note,
        )
        for pid, info in engine.policies.items()
    ]
    return PolicyList(files=files, policies=items)


@router.post("/policies/explain", summary="Explain the policy decision for a hypothetical tool call")
async def explain(
    body: ExplainBody, svc: Svc, principal: Annotated[Principal, Depends(require("policies:read"))]
) -> Explanation:
    if body.agent is None and body.workflow is None:
        raise InvalidInputError("name the caller", hint="set 'agent' or 'workflow'")
    tool = await _registry(svc).resolve(body.tool, body.version, tenant=principal.tenant)
    engine = await _policy_engine(svc, principal.tenant)
    if not engine.knows(tool):
        engine = engine.with_tools([tool])
    env = body.env or (svc.gateway.env if svc.gateway is not None else "dev")
    request = PolicyRequest(
        tool=tool,
        agent=body.agent,
        workflow=body.workflow,
        department=body.department,
        tenant=principal.tenant,
        env=env,
        args=body.args,
        cost_so_far_cents=body.cost_so_far_cents,
    )
    decision = engine.decide(request)
    return Explanation(
        effect=decision.effect,
        allowed=decision.allowed,
        approval_group=decision.approval_group,
        policy_ids=list(decision.policy_ids),
        reason=decision.reason,
        errors=list(decision.errors),
        explanation=engine.explain(request),
    )


class _AuditFilters(BaseModel):
    run_id: str | None = Field(default=None, max_length=40)
    kind: str | None = Field(default=None, max_length=40)
    actor: str | None = Field(default=None, max_length=200)
    workflow: str | None = Field(default=None, max_length=100)
    since: float | None = Field(default=None, ge=0, le=1e11)
    until: float | None = Field(default=None, ge=0, le=1e11)


def _audit_out(record: Any) -> AuditOut:
    return AuditOut(**{name: getattr(record, name) for name in AuditOut.model_fields})


@router.get("/audit", summary="Audit records of the tenant, in chain order")
async def query_audit(
    svc: Svc,
    principal: Annotated[Principal, Depends(require("audit:read"))],
    filters: Annotated[_AuditFilters, Query()],
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    cursor: str | None = None,
) -> Page[AuditOut]:
    after = cursor_of(cursor, int) or 0
    found = await _audit(svc).query(
        principal.tenant, after_seq=after, limit=limit + 1, **filters.model_dump()
    )
    page = found[:limit]
    nxt = encode_cursor(page[-1].seq) if len(found) > limit else None
    return Page[AuditOut](items=[_audit_out(r) for r in page], next_cursor=nxt)


@router.get("/audit/verify", summary="Verify the audit hash chain")
async def verify_audit(
    svc: Svc, principal: Annotated[Principal, Depends(require("audit:read"))]
) -> VerifyOut:
    result = await _audit(svc).verify(principal.tenant)
    return VerifyOut(
        ok=result.ok,
        checked=result.checked,
        first_bad_seq=result.first_bad_seq,
        problem=None if result.problem is None else str(result.problem),
        message=result.message,
    )


@router.get(
    "/audit/export",
    summary="Export the tenant's audit records as JSON Lines",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {"schema": {"type": "string"}}}}},
)
async def export_audit(
    svc: Svc,
    principal: Annotated[Principal, Depends(require("audit:export"))],
    filters: Annotated[_AuditFilters, Query()],
) -> StreamingResponse:
    log = _audit(svc)
    tenant = principal.tenant
    wanted = filters.model_dump()

    async def lines() -> AsyncIterator[str]:
        after = 0
        while True:
            page = await log.query(tenant, after_seq=after, limit=1000, **wanted)
            if not page:
                return
            yield "".join(
                json.dumps(
                    r.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
                )
                + "\n"
                for r in page
            )
            after = page[-1].seq

    headers = {"Content-Disposition": f'attachment; filename="audit-{tenant}.jsonl"'}
    return StreamingResponse(lines(), media_type="application/x-ndjson", headers=headers)


@router.get("/budgets", summary="Budgets of the tenant: caps, usage, reservations")
async def list_budgets(
    svc: Svc,
    principal: Annotated[Principal, Depends(require("budgets:read"))],
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    cursor: str | None = None,
) -> Page[BudgetOut]:
    after = cursor_of(cursor, list)
    ledger = svc.gateway.budgets if svc.gateway is not None else BudgetLedger(svc.store)
    usages = await ledger.usages(principal.tenant)
    if after is not None:
        usages = [u for u in usages if [u.scope, u.unit] > after]
    page = usages[:limit]
    nxt = encode_cursor([page[-1].scope, page[-1].unit]) if len(usages) > limit else None
    items = [
        BudgetOut(
            scope=u.scope, unit=u.unit, cap=u.cap, used=u.used, reserved=u.reserved, remaining=u.remaining
        )
        for u in page
    ]
    return Page[BudgetOut](items=items, next_cursor=nxt)
