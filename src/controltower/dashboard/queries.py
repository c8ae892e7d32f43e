"""What the pages show, read from the store: every query takes the viewer's tenant.

Nothing here renders HTML; the views turn these records into pages. Reads go through
the same objects the CLI and the API use (``ApprovalBook``, ``AuditLog``, the registry)
and plain SQLAlchemy Core where no such object exists yet (the inbox of approval steps,
workflow ownership, spend per run).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from controltower.api.tenancy import visible_names
from controltower.gateway.approvals import ApprovalBook, ApprovalRequest
from controltower.gateway.audit import AuditLog, AuditRecord
from controltower.observability.kpis import KPIResult, compute_kpis
from controltower.spec.models import WorkflowSpec
from controltower.store import tables as t
from controltower.store.base import RunFilter, RunRecord, StepRecord, WorkflowRecord
from controltower.store.sql import SqlStore

RUN_STATUSES = ("pending", "running", "waiting", "completed", "failed", "cancelled")
MICROS_PER_UNIT = 1_000_000
RUNS_PAGE = 50


async def workflow_names(store: SqlStore, tenant: str) -> list[str]:
    """The workflow names the tenant owns (the API's rule: unowned names belong to "default")."""
    return await visible_names(store, tenant, after=None, limit=100_000)


# -- runs ----------------------------------------------------------------------------------


async def list_runs(
    store: SqlStore,
    tenant: str,
    *,
    workflow: str | None,
    status: str | None,
    before: str | None = None,
    limit: int = RUNS_PAGE,
) -> list[RunRecord]:
    """Newest first; ``before`` (a run id) pages to older runs."""
    flt = RunFilter(
        workflow=workflow or None,
        status=[status] if status else None,
        tenant=tenant,
        limit=limit,
        before_id=before or None,
    )
    return await store.list_runs(flt)


@dataclass(slots=True)
class StepView:
    record: StepRecord
    depth: int

    @property
    def duration(self) -> float | None:
        end = self.record.finished_at
        return None if end is None else max(0.0, end - self.record.started_at)


@dataclass(frozen=True, slots=True)
class ModelCall:
    step_key: str
    call_index: int
    agent: str | None
    model: str
    input_tokens: int
    output_tokens: int
    cost_micros: int
    seconds: float
    fallbacks: int


@dataclass(slots=True)
class RunDetail:
    run: RunRecord
    steps: list[StepView]
    approvals: list[ApprovalRequest]
    audit: list[AuditRecord]
    spend_micros: int
    tokens: int
    children: list[RunRecord] = field(default_factory=list)
    model_calls: list[ModelCall] = field(default_factory=list)

    @property
    def waiting_step_approvals(self) -> list[StepRecord]:
        return [s.record for s in self.steps if s.record.kind == "approval" and s.record.status == "waiting"]


def _depth(step_key: str) -> int:
    return step_key.count("/") + step_key.count("[")


async def run_detail(store: SqlStore, tenant: str, run_id: str) -> RunDetail | None:
    """The run with its steps, approvals, audit records and spend, or None outside the tenant."""
    run = await store.get_run(run_id)
    if run is None or run.tenant != tenant:
        return None
    steps = await store.load_steps(run_id)
    ordered = sorted(steps.values(), key=lambda s: (s.started_at, s.step_key))
    approvals = await ApprovalBook(store).list(tenant=tenant, status=None, run_id=run_id)
    audit = await AuditLog(store).query(tenant, run_id=run_id, limit=500)
    spend = await _spend(store, tenant, [f"run:{run_id}"])
    children = await store.list_runs(RunFilter(tenant=tenant, parent_run_id=run_id, limit=100))
    return RunDetail(
        run=run,
        steps=[StepView(s, _depth(s.step_key)) for s in ordered],
        approvals=approvals,
        audit=audit,
        spend_micros=spend.get((f"run:{run_id}", "micros"), 0),
        tokens=spend.get((f"run:{run_id}", "tokens"), 0),
        children=children,
        model_calls=await _model_calls(store, tenant, run_id),
    )


async def _model_calls(store: SqlStore, tenant: str, run_id: str) -> list[ModelCall]:
    """What the run's llm agents asked of their models: tokens, cost, time (never the messages)."""
    c = t.model_calls.c

    def fn(conn: sa.Connection) -> list[ModelCall]:
        rows = conn.execute(
            sa.select(t.model_calls)
            .where(c.run_id == run_id, c.tenant == tenant)
            .order_by(c.started_at, c.step_key, c.call_index)
        )
        return [
            ModelCall(
                step_key=row.step_key,
                call_index=row.call_index,
                agent=row.agent,
                model=row.model,
                input_tokens=int(row.input_tokens),
                output_tokens=int(row.output_tokens),
                cost_micros=int(row.cost_micros),
                seconds=max(0.0, row.finished_at - row.started_at),
                fallbacks=len(json.loads(row.attempts)) if row.attempts else 0,
            )
            for row in rows
        ]

    return await store.run(fn)


async def _spend(store: SqlStore, tenant: str, scopes: Sequence[str]) -> dict[tuple[str, str], int]:
    """Used amounts of budget scopes, by (scope, unit); absent scopes spent nothing."""
    if not scopes:
        return {}

    def fn(conn: sa.Connection) -> dict[tuple[str, str], int]:
        spent: dict[tuple[str, str], int] = {}
        for start in range(0, len(scopes), 500):
            rows = conn.execute(
                sa.select(t.budgets.c.scope, t.budgets.c.unit, t.budgets.c.used).where(
                    t.budgets.c.tenant == tenant, t.budgets.c.scope.in_(list(scopes[start : start + 500]))
                )
            )
            spent.update({(row.scope, row.unit): int(row.used) for row in rows})
        return spent

    return await store.run(fn)


# -- approvals -----------------------------------------------------------------------------


@dataclass(slots=True)
class StepApproval:
    """A workflow's own ``approval`` step waiting for a decision (decided with ``tower approve``)."""

    run_id: str
    workflow: str
    step_key: str
    step_id: str
    prompt: str
    group: str | None
    shown: Any
    since: float


async def waiting_step_approvals(store: SqlStore, tenant: str, limit: int = 200) -> list[StepApproval]:
    def fn(conn: sa.Connection) -> list[StepApproval]:
        query = (
            sa.select(t.steps, t.runs.c.workflow)
            .join(t.runs, t.runs.c.id == t.steps.c.run_id)
            .where(
                t.runs.c.tenant == tenant,
                t.runs.c.status.in_(["waiting", "running", "pending"]),
                t.steps.c.kind == "approval",
                t.steps.c.status == "waiting",
            )
            .order_by(t.steps.c.started_at)
            .limit(limit)
        )
        found = []
        for row in conn.execute(query):
            detail = json.loads(row.detail) if row.detail else {}
            shown = json.loads(row.input) if row.input else None
            found.append(
                StepApproval(
                    run_id=row.run_id,
                    workflow=row.workflow,
                    step_key=row.step_key,
                    step_id=row.step_id,
                    prompt=str(detail.get("prompt") or "Approve?"),
                    group=detail.get("group"),
                    shown=shown,
                    since=row.started_at,
                )
            )
        return found

    return await store.run(fn)


async def approvals_inbox(
    store: SqlStore, tenant: str
) -> tuple[list[ApprovalRequest], list[ApprovalRequest]]:
    """Pending governed calls (oldest first) and the latest decided ones (newest first)."""
    book = ApprovalBook(store)
    pending = await book.list(tenant=tenant, status=("pending",), limit=200)
    decided = await book.list(tenant=tenant, status=("approved", "rejected", "expired"), limit=10_000)
    decided.sort(key=lambda a: a.decided_at or a.created_at, reverse=True)
    return pending, decided[:50]


# -- workflows and KPIs --------------------------------------------------------------------


@dataclass(slots=True)
class DayStats:
    day: str
    started: int = 0
    completed: int = 0
    failed: int = 0
    cycle_time: float | None = None  # median seconds from start to completion
    automation_rate: float | None = None  # completed without a human decision
    cost_per_outcome: float | None = None  # account units per completed run
    minutes_saved: float = 0.0
    kpis: dict[str, float | None] = field(default_factory=dict)


@dataclass(slots=True)
class WorkflowView:
    name: str
    versions: list[WorkflowRecord]
    spec: WorkflowSpec
    days: list[DayStats]
    kpis: list[KPIResult]
    totals: dict[str, float]


async def workflow_summaries(store: SqlStore, tenant: str) -> list[tuple[WorkflowRecord, int]]:
    """The newest version of each of the tenant's workflows and its number of versions."""
    names = set(await workflow_names(store, tenant))
    newest: dict[str, WorkflowRecord] = {}
    counts: dict[str, int] = {}
    for record in await store.list_workflows():
        if record.name in names:
            newest[record.name] = record
            counts[record.name] = counts.get(record.name, 0) + 1
    return [(newest[n], counts[n]) for n in sorted(newest)]


async def workflow_view(store: SqlStore, tenant: str, name: str, *, days: int = 14) -> WorkflowView | None:
    if name not in await workflow_names(store, tenant):
        return None
    versions = [r for r in await store.list_workflows() if r.name == name]
    if not versions:
        return None
    spec = WorkflowSpec.model_validate(versions[-1].spec)
    since = time.time() - days * 86400
    runs = [
        r
        for r in await store.list_runs(RunFilter(workflow=name, tenant=tenant, limit=5000))
        if r.created_at >= since
    ]
    humans = await _decided_by_humans(store, [r.id for r in runs])
    spend = await _spend(store, tenant, [f"run:{r.id}" for r in runs])
    buckets: dict[str, list[RunRecord]] = {}
    for run in runs:
        buckets.setdefault(_day(run.created_at), []).append(run)
    stats = [_day_stats(day, buckets.get(day, []), spec, humans, spend) for day in _days(days)]
    kpis = compute_kpis(spec, runs)
    done = [r for r in runs if r.status == "completed"]
    total_micros = sum(spend.get((f"run:{r.id}", "micros"), 0) for r in runs)
    totals = {
        "runs": float(len(runs)),
        "completed": float(len(done)),
        "minutes_saved": sum(s.minutes_saved for s in stats),
        "cost": total_micros / MICROS_PER_UNIT,
        "automated": float(sum(1 for r in done if r.id not in humans)),
    }
    return WorkflowView(name, versions, spec, stats, kpis, totals)


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def _days(count: int) -> list[str]:
    now = time.time()
    return [_day(now - back * 86400) for back in range(count - 1, -1, -1)]


def _day_stats(
    day: str,
    runs: list[RunRecord],
    spec: WorkflowSpec,
    humans: set[str],
    spend: dict[tuple[str, str], int],
) -> DayStats:
    done = [r for r in runs if r.status == "completed"]
    stats = DayStats(day, started=len(runs), completed=len(done))
    stats.failed = sum(1 for r in runs if r.status == "failed")
    if done:
        stats.cycle_time = statistics.median((r.finished_at or r.updated_at) - r.created_at for r in done)
        stats.automation_rate = sum(1 for r in done if r.id not in humans) / len(done)
        micros = sum(spend.get((f"run:{r.id}", "micros"), 0) for r in runs)
        stats.cost_per_outcome = micros / MICROS_PER_UNIT / len(done)
    for kpi in compute_kpis(spec, runs):
        stats.kpis[kpi.name] = kpi.value
        stats.minutes_saved += kpi.minutes_saved or 0.0
    return stats


async def _decided_by_humans(store: SqlStore, run_ids: Sequence[str]) -> set[str]:
    """Runs in which a person decided something (an approval step or a governed call)."""

    def fn(conn: sa.Connection) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(run_ids), 500):
            chunk = list(run_ids[start : start + 500])
            steps = sa.select(t.steps.c.run_id).where(
                t.steps.c.kind == "approval", t.steps.c.run_id.in_(chunk)
            )
            calls = sa.select(t.approvals.c.run_id).where(t.approvals.c.run_id.in_(chunk))
            found.update(row[0] for row in conn.execute(steps.union(calls)))
        return found

    return await store.run(fn)
