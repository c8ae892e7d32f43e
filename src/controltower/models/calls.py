"""The record of completed model requests: keyed (run, step, call index), like a step.

A replay (after a crash, a retry, or an approval that parked the run) reads the recorded
response instead of calling the model again. Rows hold what was sent and received, tokens
and cost — never an API key or a base URL.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from controltower.store import SqlStore
from controltower.store import tables as t


@dataclass(frozen=True, slots=True)
class ModelCallRecord:
    run_id: str
    step_key: str
    call_index: int
    tenant: str
    workflow: str
    agent: str | None
    model: str
    request: str  # JSON
    response: str  # JSON
    input_tokens: int
    output_tokens: int
    cost_micros: int
    attempts: list[dict[str, Any]] | None
    started_at: float
    finished_at: float


@dataclass(frozen=True, slots=True)
class ModelUsage:
    calls: int
    input_tokens: int
    output_tokens: int
    cost_micros: int


_M = t.model_calls.c
_GET = sa.select(t.model_calls).where(
    _M.run_id == sa.bindparam("run_id"),
    _M.step_key == sa.bindparam("step_key"),
    _M.call_index == sa.bindparam("call_index"),
)


def _record(row: sa.Row[Any]) -> ModelCallRecord:
    data = dict(row._mapping)
    data["attempts"] = json.loads(data["attempts"]) if data["attempts"] else None
    for name in ("input_tokens", "output_tokens", "cost_micros"):
        data[name] = int(data[name])
    return ModelCallRecord(**data)


class ModelCallLog:
    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self._insert = store.insert(t.model_calls).on_conflict_do_nothing(
            index_elements=["run_id", "step_key", "call_index"]
        )

    async def get(self, run_id: str, step_key: str, call_index: int) -> ModelCallRecord | None:
        params = {"run_id": run_id, "step_key": step_key, "call_index": call_index}

        def fn(conn: Connection) -> ModelCallRecord | None:
            row = conn.execute(_GET, params).first()
            return None if row is None else _record(row)

        return await self.store.run(fn)

    async def for_step(self, run_id: str, step_key: str) -> dict[int, ModelCallRecord]:
        """Every recorded call of one step, by call index (one read for a whole replay)."""

        def fn(conn: Connection) -> dict[int, ModelCallRecord]:
            query = sa.select(t.model_calls).where(_M.run_id == run_id, _M.step_key == step_key)
            return {rec.call_index: rec for rec in map(_record, conn.execute(query))}

        return await self.store.run(fn)

    def record_in(self, conn: Connection, rec: ModelCallRecord) -> bool:
        """Insert inside the caller's transaction; False if the call was already recorded."""
        row = asdict(rec)
        row["attempts"] = json.dumps(rec.attempts) if rec.attempts else None
        return bool(conn.execute(self._insert, row).rowcount)

    async def list(self, run_id: str, tenant: str | None = None) -> list[ModelCallRecord]:
        """A run's model calls in order (only the tenant's own when ``tenant`` is given)."""

        def fn(conn: Connection) -> list[ModelCallRecord]:
            query = sa.select(t.model_calls).where(_M.run_id == run_id)
            if tenant is not None:
                query = query.where(_M.tenant == tenant)
            rows = conn.execute(query.order_by(_M.started_at, _M.step_key, _M.call_index))
            return [_record(row) for row in rows]

        return await self.store.run(fn)

    async def usage(self, run_id: str, tenant: str | None = None) -> ModelUsage:
        calls = await self.list(run_id, tenant)
        return ModelUsage(
            len(calls),
            sum(c.input_tokens for c in calls),
            sum(c.output_tokens for c in calls),
            sum(c.cost_micros for c in calls),
        )
