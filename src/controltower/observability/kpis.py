"""KPIs: each workflow names the business numbers it moves; we compute them from runs."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from controltower.spec import expressions
from controltower.spec.errors import ExpressionError
from controltower.spec.models import KPISpec, WorkflowSpec
from controltower.store.base import RunRecord


@dataclass(frozen=True)
class KPIResult:
    name: str
    value: float | None
    runs: int
    baseline: float | None
    target: float | None
    unit: str | None
    minutes_saved: float | None
    errors: int
    direction: str = "up"

    @property
    def meets_target(self) -> bool | None:
        if self.value is None or self.target is None:
            return None
        if self.direction == "down":
            return self.value <= self.target
        return self.value >= self.target


def compute_kpis(spec: WorkflowSpec, runs: Iterable[RunRecord]) -> list[KPIResult]:
    """Aggregate every KPI of ``spec`` over the completed runs given."""
    done = [r for r in runs if r.status == "completed"]
    return [_one(kpi, done) for kpi in spec.kpis]


def _one(kpi: KPISpec, runs: list[RunRecord]) -> KPIResult:
    values: list[float] = []
    errors = 0
    for run in runs:
        names = {
            "output": run.output,
            "input": run.input,
            "run": {"id": run.id, "duration": (run.finished_at or run.updated_at) - run.created_at},
        }
        try:
            raw = expressions.evaluate(kpi.measure, names)
        except ExpressionError:
            errors += 1
            continue
        if isinstance(raw, bool | int | float):
            values.append(float(raw))
        elif raw is not None:
            errors += 1
    value = _aggregate(kpi.aggregate, values)
    saved = None
    if kpi.minutes_saved_per_run is not None:
        saved = kpi.minutes_saved_per_run * sum(1 for v in values if v)
    return KPIResult(
        kpi.name, value, len(values), kpi.baseline, kpi.target, kpi.unit, saved, errors, kpi.direction
    )


def _aggregate(how: str, values: list[float]) -> float | None:
    if how == "count":
        return float(len(values))
    if not values:
        return None
    if how in ("mean", "rate"):
        return sum(values) / len(values)
    if how == "sum":
        return sum(values)
    if how == "p50":
        return statistics.median(values)
    if how == "p95":
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    raise ValueError(f"unknown aggregate {how}")
