"""Live run events as Server-Sent Events.

There is no event bus between processes, so the stream polls the store every
``Services.stream_poll_seconds`` and sends what changed: ``run`` (status), ``step``
(a step recorded or changed) and finally ``end``. A comment line keeps idle
connections alive.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.engine import Connection

from controltower.api.deps import Services, require, services
from controltower.api.problems import PROBLEM_RESPONSES
from controltower.api.routes.runs import step_out, tenant_run
from controltower.auth import Principal
from controltower.store import TERMINAL
from controltower.store import tables as t

router = APIRouter(prefix="/v1", tags=["events"], responses=PROBLEM_RESPONSES)

Svc = Annotated[Services, Depends(services)]
KEEPALIVE = 15.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "An SSE stream"}
}


def _event(kind: str, data: Any, seq: int) -> str:
    return f"id: {seq}\nevent: {kind}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


@router.get(
    "/runs/{run_id}/events",
    summary="Stream a run's events (SSE) until it finishes",
    response_class=StreamingResponse,
    responses=_SSE_DOC,
)
async def run_events(
    run_id: Annotated[str, Path(min_length=1, max_length=40)],
    request: Request,
    svc: Svc,
    principal: Annotated[Principal, Depends(require("runs:read"))],
    max_seconds: Annotated[float, Query(gt=0, le=86400)] = 3600,
) -> StreamingResponse:
    await tenant_run(svc, principal, run_id)

    async def events() -> AsyncIterator[str]:
        seq = 0
        seen_status: tuple[str, float] | None = None
        seen_steps: dict[str, tuple[str, int, float | None]] = {}
        deadline = time.monotonic() + max_seconds
        last_sent = time.monotonic()
        while True:
            run = await svc.store.get_run(run_id)
            if run is None:
                return
            steps = await svc.store.load_steps(run_id)
            for key, step in sorted(steps.items(), key=lambda kv: (kv[1].started_at, kv[0])):
                mark = (step.status, step.attempts, step.finished_at)
                if seen_steps.get(key) != mark:
                    seen_steps[key] = mark
                    seq += 1
                    yield _event("step", {"run_id": run_id, **step_out(step).model_dump(mode="json")}, seq)
            if seen_status != (run.status, run.updated_at):
                seen_status = (run.status, run.updated_at)
                seq += 1
                yield _event(
                    "run",
                    {"id": run.id, "status": run.status, "waiting_on": run.waiting_on, "error": run.error},
                    seq,
                )
                last_sent = time.monotonic()
            if run.status in TERMINAL:
                seq += 1
                yield _event("end", {"id": run.id, "status": run.status, "output": run.output}, seq)
                return
            if time.monotonic() >= deadline or await request.is_disconnected():
                return
            if time.monotonic() - last_sent >= KEEPALIVE:
                last_sent = time.monotonic()
                yield ": keepalive\n\n"
            await asyncio.sleep(svc.stream_poll_seconds)

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.get(
    "/events",
    summary="Stream status changes of the tenant's runs (SSE)",
    response_class=StreamingResponse,
    responses=_SSE_DOC,
)
async def tenant_events(
    request: Request,
    svc: Svc,
    principal: Annotated[Principal, Depends(require("runs:read"))],
    workflow: Annotated[str | None, Query(max_length=100)] = None,
    since: Annotated[float | None, Query(ge=0, le=1e11)] = None,
    max_seconds: Annotated[float, Query(gt=0, le=86400)] = 3600,
) -> StreamingResponse:
    tenant = principal.tenant

    async def events() -> AsyncIterator[str]:
        cursor = (since if since is not None else time.time(), "")
        seq = 0
        deadline = time.monotonic() + max_seconds
        last_sent = time.monotonic()
        while True:
            after = cursor

            def fn(conn: Connection, after: tuple[float, str] = after) -> list[sa.Row[Any]]:
                c = t.runs.c
                query = sa.select(c.id, c.workflow, c.version, c.status, c.waiting_on, c.updated_at).where(
                    c.tenant == tenant,
                    sa.or_(c.updated_at > after[0], sa.and_(c.updated_at == after[0], c.id > after[1])),
                )
                if workflow is not None:
                    query = query.where(c.workflow == workflow)
                return list(conn.execute(query.order_by(c.updated_at, c.id).limit(200)))

            for row in await svc.store.run(fn):
                cursor = (row.updated_at, row.id)
                seq += 1
                last_sent = time.monotonic()
                yield _event("run", dict(row._mapping), seq)
            if time.monotonic() >= deadline or await request.is_disconnected():
                return
            if time.monotonic() - last_sent >= KEEPALIVE:
                last_sent = time.monotonic()
                yield ": keepalive\n\n"
            await asyncio.sleep(svc.stream_poll_seconds)

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
