"""Workflow specs: validate, publish immutable versions, list versions, KPIs.

Specs published over HTTP have no base directory: their ``impl``/``offline`` callables must be
importable on the server (a spec names code, it never uploads code).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, Field, model_validator
from sqlalchemy.engine import Connection

from controltower.api import tenancy
from controltower.api.deps import Services, require, services
from controltower.api.pagination import MAX_LIMIT, Page, cursor_of, encode_cursor
from controltower.api.problems import PROBLEM_RESPONSES
from controltower.auth import DEFAULT_TENANT, Principal
from controltower.gateway.engine_gate import spec_tool
from controltower.observability.kpis import compute_kpis
from controltower.spec.errors import NotFoundError, SpecError
from controltower.spec.loader import load_spec_data, load_spec_text
from controltower.spec.models import WorkflowSpec
from controltower.store import RunFilter
from controltower.store import tables as t
from controltower.store.base import WorkflowRecord

router = APIRouter(prefix="/v1", tags=["specs"], responses=PROBLEM_RESPONSES)

Svc = Annotated[Services, Depends(services)]
MAX_KPI_RUNS = 5000


class SpecBody(BaseModel):
    """A spec as a JSON object (``spec``) or as YAML text (``yaml``): exactly one of them."""

    spec: dict[str, Any] | None = None
    yaml: str | None = Field(default=None, max_length=1024 * 1024)

    @model_validator(mode="after")
    def _one(self) -> SpecBody:
        if (self.spec is None) == (self.yaml is None):
            raise ValueError("send exactly one of 'spec' (a JSON object) or 'yaml' (text)")
        return self


class Issue(BaseModel):
    path: str
    message: str
    hint: str | None = None
    line: int | None = None


class Validation(BaseModel):
    valid: bool
    name: str | None = None
    issues: list[Issue] = Field(default_factory=list)


class WorkflowVersion(BaseModel):
    name: str
    version: int
    digest: str
    created_at: float
    description: str | None = None


class WorkflowDetail(WorkflowVersion):
    spec: dict[str, Any]


class WorkflowSummary(BaseModel):
    name: str
    latest_version: int
    description: str | None = None
    updated_at: float


class KPIOut(BaseModel):
    name: str
    value: float | None
    runs: int
    baseline: float | None
    target: float | None
    unit: str | None
    minutes_saved: float | None
    meets_target: bool | None
    errors: int


class KPIReport(BaseModel):
    workflow: str
    version: int
    runs_considered: int
    kpis: list[KPIOut]


async def _parse(body: SpecBody) -> WorkflowSpec:
    if body.yaml is not None:
        return await asyncio.to_thread(load_spec_text, body.yaml)
    assert body.spec is not None
    return load_spec_data(body.spec)


def _version(record: WorkflowRecord) -> WorkflowVersion:
    return WorkflowVersion(
        name=record.name,
        version=record.version,
        digest=record.digest,
        created_at=record.created_at,
        description=record.spec.get("description") if isinstance(record.spec, dict) else None,
    )


@router.post("/specs/validate", summary="Validate a spec without publishing it")
async def validate_spec(
    body: SpecBody, _p: Annotated[Principal, Depends(require("specs:read"))]
) -> Validation:
    try:
        spec = await _parse(body)
    except SpecError as exc:
        issues = [Issue(path=i.path, message=i.message, hint=i.hint, line=i.line) for i in exc.issues]
        return Validation(valid=False, issues=issues)
    return Validation(valid=True, name=spec.name)


@router.post("/workflows", status_code=201, summary="Publish a spec as a new immutable version")
async def publish(
    body: SpecBody,
    response: Response,
    svc: Svc,
    principal: Annotated[Principal, Depends(require("specs:publish"))],
) -> WorkflowVersion:
    spec = await _parse(body)
    await tenancy.claim(svc.store, principal.tenant, spec.name, principal.subject)
    before = await svc.store.get_workflow(spec.name)
    record = await svc.engine.publish(spec)
    if svc.gateway is not None and principal.tenant != DEFAULT_TENANT:
        # the engine registers a workflow's own tools for tenant "default"; runs resolve tools in
        # their tenant's registry, so the owning tenant gets them too (same name, version, digest)
        owner = spec.owner.team if spec.owner else "unowned"
        for tool_name, tool in spec.tools.items():
            definition = spec_tool(spec.name, record.version, tool_name, tool, owner, None)
            await svc.gateway.registry.register(definition, tenant=principal.tenant)
    if before is not None and before.digest == record.digest:
        response.status_code = 200  # the same content keeps its version
    return _version(record)


@router.get("/workflows", summary="Workflows of the caller's tenant, by name")
async def list_workflows(
    svc: Svc,
    principal: Annotated[Principal, Depends(require("specs:read"))],
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: str | None = None,
) -> Page[WorkflowSummary]:
    after = cursor_of(cursor, str)
    names = await tenancy.visible_names(svc.store, principal.tenant, after=after, limit=limit + 1)
    items = []
    for name in names[:limit]:
        record = await svc.store.get_workflow(name)
        if record is None:
            continue
        items.append(
            WorkflowSummary(
                name=name,
                latest_version=record.version,
                description=record.spec.get("description"),
                updated_at=record.created_at,
            )
        )
    nxt = encode_cursor(names[limit - 1]) if len(names) > limit else None
    return Page[WorkflowSummary](items=items, next_cursor=nxt)


@router.get("/workflows/{name}/versions", summary="Every published version of a workflow")
async def list_versions(
    name: str,
    svc: Svc,
    principal: Annotated[Principal, Depends(require("specs:read"))],
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: str | None = None,
) -> Page[WorkflowVersion]:
    await tenancy.check_visible(svc.store, principal.tenant, name)
    after = cursor_of(cursor, int)

    def fn(conn: Connection) -> list[sa.Row[Any]]:
        query = sa.select(t.workflows).where(t.workflows.c.name == name)
        if after is not None:
            query = query.where(t.workflows.c.version < after)
        return list(conn.execute(query.order_by(t.workflows.c.version.desc()).limit(limit + 1)))

    rows = await svc.store.run(fn)
    items = [
        WorkflowVersion(
            name=r.name, version=r.version, digest=r.digest, created_at=r.created_at, description=None
        )
        for r in rows[:limit]
    ]
    nxt = encode_cursor(items[-1].version) if len(rows) > limit else None
    return Page[WorkflowVersion](items=items, next_cursor=nxt)


async def _record(svc: Services, principal: Principal, name: str, version: int | None) -> WorkflowRecord:
    await tenancy.check_visible(svc.store, principal.tenant, name)
    record = await svc.store.get_workflow(name, version)
    if record is None:
        raise NotFoundError(f"workflow {name!r} has no version {version}")
    return record


@router.get("/workflows/{name}", summary="The latest version of a workflow, with its spec")
async def get_workflow(
    name: str, svc: Svc, principal: Annotated[Principal, Depends(require("specs:read"))]
) -> WorkflowDetail:
    record = await _record(svc, principal, name, None)
    return WorkflowDetail(**_version(record).model_dump(), spec=record.spec)


@router.get("/workflows/{name}/versions/{version}", summary="One version of a workflow, with its spec")
async def get_version(
    name: str,
    version: Annotated[int, Path(ge=1, le=2**31 - 1)],
    svc: Svc,
    principal: Annotated[Principal, Depends(require("specs:read"))],
) -> WorkflowDetail:
    record = await _record(svc, principal, name, version)
    return WorkflowDetail(**_version(record).model_dump(), spec=record.spec)


@router.get("/workflows/{name}/kpis", summary="The workflow's KPIs over its recent completed runs")
async def kpis(
    name: str,
    svc: Svc,
    principal: Annotated[Principal, Depends(require("kpis:read"))],
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    runs: Annotated[int, Query(ge=1, le=MAX_KPI_RUNS)] = 1000,
) -> KPIReport:
    record = await _record(svc, principal, name, version)
    spec, _ = await svc.engine.spec_for(record.name, record.version)
    found = await svc.store.list_runs(
        RunFilter(workflow=name, status=["completed"], tenant=principal.tenant, limit=runs)
    )
    if version is not None:
        found = [r for r in found if r.version == version]
    results = compute_kpis(spec, found)
    return KPIReport(
        workflow=name,
        version=record.version,
        runs_considered=len(found),
        kpis=[
            KPIOut(
                name=k.name,
                value=k.value,
                runs=k.runs,
                baseline=k.baseline,
                target=k.target,
                unit=k.unit,
                minutes_saved=k.minutes_saved,
                meets_target=k.meets_target,
                errors=k.errors,
            )
            for k in results
        ],
    )
