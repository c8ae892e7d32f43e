"""Records and queries shared by the store conformance tests."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import sqlalchemy as sa

from controltower.spec.ids import new_id
from controltower.store import RunRecord, SqlStore, StepRecord
from controltower.store import tables as t

BIG = "x" * (20 * 1024)  # > PAYLOAD_INLINE_LIMIT (16 KB) once serialised


def make_run(workflow: str = "wf", status: str = "pending", **fields: Any) -> RunRecord:
    now = fields.pop("created_at", time.time())
    return RunRecord(
        id=fields.pop("id", new_id("run")),
        workflow=workflow,
        version=fields.pop("version", 1),
        status=status,
        input=fields.pop("input", {"n": 1}),
        created_at=now,
        updated_at=now,
        **fields,
    )


def make_step(run_id: str, key: str, status: str = "completed", **fields: Any) -> StepRecord:
    return StepRecord(
        run_id=run_id,
        step_key=key,
        step_id=key.rsplit("/", 1)[-1],
        kind=fields.pop("kind", "tool"),
        status=status,
        started_at=fields.pop("started_at", time.time()),
        **fields,
    )


async def new_run(store: SqlStore, **fields: Any) -> RunRecord:
    run, created = await store.create_run(make_run(**fields))
    assert created
    return run


async def payload_rows(store: SqlStore) -> list[tuple[str, int]]:
    def query() -> list[tuple[str, int]]:
        with store.engine.connect() as conn:
            rows = conn.execute(sa.select(t.payloads.c.digest, t.payloads.c.size)).all()
            return [(row[0], row[1]) for row in rows]

    return await asyncio.to_thread(query)


async def fetch(store: SqlStore, run_id: str) -> RunRecord:
    """The run, which must exist."""
    run = await store.get_run(run_id)
    assert run is not None, f"run {run_id} is missing"
    return run
