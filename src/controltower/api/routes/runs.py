"""Runs: start (idempotent), list, detail with steps, cancel, resume, signal, decide step approvals."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Response
from pydantic import BaseModel, Field

from controltower.api import tenancy
from controltower.api.deps import Services, require, services
from controltower.api.pagination import MAX_LIMIT, Page, cursor_of, encode_cursor
from controltower.api.problems import PROBLEM_RESPONSES
from controltower.auth import PermissionDeniedError, Principal
from controltower.spec.errors import ConflictError, NotFoundError
from controltower.store import RunFilter, RunRecord
from controltower.store.base import StepRecord

router = APIRouter(prefix="/v1", tags=["runs"], responses=PROBLEM_RESPONSES)

Svc = Annotated[Services, Depends(services)]
RunId = Annotated[str, Path(min_length=1, max_length=40)]
RunStatus = Literal["pending", "running", "waiting", "completed", "failed", "cancelled"]


_PRINTABLE = r"^[^\x00-\x1f\x7f]+$"


class StartRun(BaseModel):
    workflow: str = Field(min_length=1, max_length=100)
    version: int | None = Field(default=None, ge=1, le=2**31 - 1)
    input: Any = None
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200, pattern=_PRINTABLE)


class RunOut(BaseModel):
    id: str
    workflow: str
    version: int
    status: str
    input: Any = None
    output: Any = None
    error: dict[str, Any] | None = None
    idempotency_key: str | None = None
    parent_run_id: str | None = None
    waiting_on: str | None = None
    cancel_requested: bool = False
    created_at: float
    updated_at: float
    finished_at: float | None = None


class RunSummary(BaseModel):
    id: str
    workflow: str
    version: int
    status: str
    waiting_on: str | None = None
    created_at: float
    updated_at: float
    finished_at: float | None = None


class StepOut(BaseModel):
    step_key: str
    step_id: str
    kind: str
    status: str
    attempts: int
    input: Any = None
    output: Any = None
    error: dict[str, Any] | None = None
    detail: dict[str, Any] = Field(default_factory=dict)
    started_at: float
    finished_at: float | None = None


class RunDetail(RunOut):
    steps: list[StepOut]


class CancelBody(BaseModel):
    reason: str | None = Field(default=None, max_length=2000)


class SignalBody(BaseModel):
    event: str = Field(min_length=1, max_length=190, pattern=r"^[A-Za-z0-9_.:-]+$")
    data: Any = None


class StepDecision(BaseModel):
    approved: bool
    comment: str | None = Field(default=None, max_length=4000)


def run_out(run: RunRecord) -> RunOut:
    return RunOut(
        id=run.id,
        workflow=run.workflow,
        version=run.version,
        status=run.status,
        input=run.input,
        output=run.output,
        error=run.error,
        idempotency_key=run.idempotency_key,
        parent_run_id=run.parent_run_id,
        waiting_on=run.waiting_on,
        cancel_requested=run.cancel_requested,
        created_at=run.created_at,
        updated_at=run.updated_at,
        finished_at=run.finished_at,
    )


def step_out(step: StepRecord) -> StepOut:
    return StepOut(
        step_key=step.step_key,
        step_id=step.step_id,
        kind=step.kind,
        status=step.status,
        attempts=step.attempts,
        input=step.input,
        output=step.output,
        error=step.error,
        detail=step.detail,
        started_at=step.started_at,
        finished_at=step.finished_at,
    )


async def tenant_run(svc: Services, principal: Principal, run_id: str) -> RunRecord:
    """The run if it belongs to the caller's tenant; otherwise exactly like a missing run."""
    run = await svc.store.get_run(run_id)
    if run is None or run.tenant != principal.tenant:
        raise NotFoundError(f"no run {run_id!r}", hint="list runs with GET /v1/runs")
    return run


async def _existing(svc: Services, tenant: str, workflow: str, key: str) -> RunRecord | None:
    import sqlalchemy as sa

    from controltower.store import tables as t

    def fn(conn: Any) -> str | None:
        return conn.execute(  # type: ignore[no-any-return]
            sa.select(t.runs.c.id).where(
                t.runs.c.tenant == tenant, t.runs.c.workflow == workflow, t.runs.c.idempotency_key == key
            )
        ).scalar_one_or_none()

    run_id = await svc.store.run(fn)
    return None if run_id is None else await svc.store.get_run(run_id)


@router.post("/runs", status_code=201, summary="Start a run (idempotent with an idempotency key)")
async def start_run(
    body: StartRun,
    response: Response,
    svc: Svc,
    principal: Annotated[Principal, Depends(require("runs:start"))],
    idempotency_key: Annotated[str | None, Header(max_length=200, pattern=_PRINTABLE)] = None,
) -> RunOut:
    key = body.idempotency_key or idempotency_key
    await tenancy.check_visible(svc.store, principal.tenant, body.workflow)
    if key is not None:
        found = await _existing(svc, principal.tenant, body.workflow, key)
        if found is not None:
            if found.input != ({} if body.input is None else body.input):
                raise ConflictError(
                    f"idempotency key {key!r} was used with a different input",
                    hint="use a new key for a different request",
                )
            response.status_code = 200
            return run_out(found)
    run_id = await svc.engine.start(
        body.workflow, body.input, version=body.version, idempotency_key=key, tenant=principal.tenant
    )
    run = await svc.engine.get(run_id)
    return run_out(run)


@router.get("/runs", summary="Runs of the caller's tenant, newest first")
async def list_runs(
    svc: Svc,
    principal: Annotated[Principal, Depends(require("runs:read"))],
    workflow: Annotated[str | None, Query(max_length=100)] = None,
    status: Annotated[list[RunStatus] | None, Query()] = None,
    parent_run_id: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: str | None = None,
) -> Page[RunSummary]:
    before = cursor_of(cursor, str)
    flt = RunFilter(
        workflow=workflow,
        status=status or None,
        tenant=principal.tenant,
        parent_run_id=parent_run_id,
        limit=limit + 1,
        before_id=before,
    )
    found = await svc.store.list_runs(flt)
    items = [
        RunSummary(
            id=r.id,
            workflow=r.workflow,
            version=r.version,
            status=r.status,
            waiting_on=r.waiting_on,
            created_at=r.created_at,
            updated_at=r.updated_at,
            finished_at=r.finished_at,
        )
        for r in found[:limit]
    ]
    nxt = encode_cursor(items[-1].id) if len(found) > limit else None
    return Page[RunSummary](items=items, next_cursor=nxt)


@router.get("/runs/{run_id}", summary="A run with its steps")
async def get_run(
    run_id: RunId, svc: Svc, principal: Annotated[Principal, Depends(require("runs:read"))]
) -> RunDetail:
    run = await tenant_run(svc, principal, run_id)
    steps = await svc.store.load_steps(run.id)
    ordered = sorted(steps.values(), key=lambda s: (s.started_at, s.step_key))
    return RunDetail(**run_out(run).model_dump(), steps=[step_out(s) for s in ordered])


@router.post("/runs/{run_id}/cancel", summary="Cancel a run that has not finished")
async def cancel_run(
    run_id: RunId,
    svc: Svc,
    principal: Annotated[Principal, Depends(require("runs:cancel"))],
    body: CancelBody | None = None,
) -> RunOut:
    await tenant_run(svc, principal, run_id)
    run = await svc.engine.cancel(run_id, reason=body.reason if body else None)
    return run_out(run)


@router.post("/runs/{run_id}/resume", summary="Resume a failed run from the step that failed")
async def resume_run(
    run_id: RunId, svc: Svc, principal: Annotated[Principal, Depends(require("runs:resume"))]
) -> RunOut:
    await tenant_run(svc, principal, run_id)
    await svc.engine.resume(run_id)
    return run_out(await svc.engine.get(run_id))


@router.post("/runs/{run_id}/signals", status_code=202, summary="Send an event to a run")
async def signal_run(
    run_id: RunId,
    body: SignalBody,
    svc: Svc,
    principal: Annotated[Principal, Depends(require("runs:signal"))],
) -> RunOut:
    await tenant_run(svc, principal, run_id)
    await svc.engine.signal(run_id, body.event, body.data)
    return run_out(await svc.engine.get(run_id))


@router.post(
    "/runs/{run_id}/approvals/{step:path}",
    summary="Decide an approval step of a run (by step id or key)",
)
async def decide_step(
    run_id: RunId,
    step: Annotated[str, Path(min_length=1, max_length=500)],
    body: StepDecision,
    svc: Svc,
    principal: Annotated[Principal, Depends(require("approvals:decide"))],
) -> RunOut:
    await tenant_run(svc, principal, run_id)
    steps = await svc.store.load_steps(run_id)
    waiting = [
        s
        for s in steps.values()
        if s.kind == "approval" and s.status == "waiting" and step in (s.step_key, s.step_id)
    ]
    for record in waiting:
        group = record.detail.get("group") if isinstance(record.detail, dict) else None
        if not principal.in_group(group):
            raise PermissionDeniedError(
                f"{principal.subject} may not decide this approval: it needs group {group!r}",
                hint="ask an admin to add you to the group",
            )
    await svc.engine.decide(run_id, step, approved=body.approved, by=principal.subject, comment=body.comment)
    return run_out(await svc.engine.get(run_id))
