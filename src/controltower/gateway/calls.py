"""Idempotent tool calls: one row per call key (tenant, run, step, call index).

``claim`` marks a call as started — in the same transaction that consumes its approval —
before the executor runs; ``complete`` records the result. A repeat of a completed call
returns the recorded result without executing. A call found *started* but never finished
(the process died mid-call) is "in doubt": a read re-executes; a write re-executes only if
the tool is declared idempotent (it receives the same idempotency key); any other write is
refused until a human reconciles it, because running it again could pay an invoice twice.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa

from controltower.gateway.approvals import ApprovalBook
from controltower.store import tables as t
from controltower.store.sql import SqlStore, dumps

CallStatus = Literal["started", "completed", "failed"]


@dataclass(frozen=True, slots=True)
class CallRecord:
    key: str
    tool: str
    version: str
    args_digest: str
    status: CallStatus
    result: Any
    error: dict[str, Any] | None
    started_at: float
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class CallRecordRow:
    """What identifies a call when its row is written."""

    key: str
    tenant: str
    tool: str
    version: str
    digest: str
    run_id: str | None
    step_key: str | None


@dataclass(frozen=True, slots=True)
class Claim:
    outcome: Literal["claimed", "completed", "in_doubt", "approval_used", "digest_mismatch"]
    record: CallRecord | None = None


class CallLog:
    def __init__(self, store: SqlStore) -> None:
        self.store = store

    async def get(self, key: str) -> CallRecord | None:
        return await self.store.run(lambda conn: _get(conn, key))

    async def claim(
        self,
        key: str,
        *,
        tenant: str,
        tool: str,
        version: str,
        digest: str,
        run_id: str | None,
        step_key: str | None,
        retry_in_doubt: bool,
        approval: tuple[str, str] | None = None,
    ) -> Claim:
        """Start the call unless it already ran; consume its approval (call_key, digest) atomically."""
        now = time.time()

        def fn(conn: sa.Connection) -> Claim:
            prior = _get(conn, key, lock=conn.dialect.name == "postgresql")
            if prior is not None:
                if prior.args_digest != digest:
                    return Claim("digest_mismatch", prior)
                if prior.status == "completed":
                    return Claim("completed", prior)
                if prior.status == "started" and not retry_in_doubt:
                    return Claim("in_doubt", prior)
            if approval is not None and (prior is None or prior.status != "failed"):
                used = ApprovalBook.consume_in(conn, *approval)
                if not used and prior is None:
                    return Claim("approval_used")
            if prior is None:
                conn.execute(
                    t.tool_calls.insert().values(
                        idem_key=key,
                        tenant=tenant,
                        run_id=run_id,
                        step_key=step_key,
                        tool=tool,
                        version=version,
                        args_digest=digest,
                        status="started",
                        started_at=now,
                    )
                )
            else:
                conn.execute(
                    t.tool_calls.update()
                    .where(t.tool_calls.c.idem_key == key)
                    .values(status="started", error=None, started_at=now, finished_at=None)
                )
            return Claim("claimed")

        try:
            return await self.store.run(fn)
        except sa.exc.IntegrityError:  # a concurrent claim of the same key won
            return Claim("in_doubt", await self.get(key))

    async def complete(self, key: str, result: Any) -> None:
        await self._finish(key, "completed", result=dumps(result))

    @staticmethod
    def complete_in(conn: sa.Connection, call: CallRecordRow, result: Any) -> None:
        """Record the result inside the caller's transaction (with its audit record).

        A claimed call's row is updated; an unclaimed one (a read) is inserted completed.
        """
        now = time.time()
        text = dumps(result)
        done = conn.execute(
            t.tool_calls.update()
            .where(t.tool_calls.c.idem_key == call.key)
            .values(status="completed", finished_at=now, result=text)
        ).rowcount
        if done == 0:
            conn.execute(
                t.tool_calls.insert().values(
                    idem_key=call.key,
                    tenant=call.tenant,
                    run_id=call.run_id,
                    step_key=call.step_key,
                    tool=call.tool,
                    version=call.version,
                    args_digest=call.digest,
                    status="completed",
                    result=text,
                    started_at=now,
                    finished_at=now,
                )
            )

    async def fail(self, key: str, error: dict[str, Any]) -> None:
        await self._finish(key, "failed", error=json.dumps(error, default=str))

    async def resolve_in_doubt(self, key: str, *, result: Any = None, failed: bool = False) -> None:
        """A human reconciled an in-doubt call: record what really happened."""
        if failed:
            await self.fail(key, {"code": "reconciled_failed", "message": "marked failed by an operator"})
        else:
            await self.complete(key, result)

    async def _finish(self, key: str, status: str, **values: Any) -> None:
        def fn(conn: sa.Connection) -> None:
            conn.execute(
                t.tool_calls.update()
                .where(t.tool_calls.c.idem_key == key)
                .values(status=status, finished_at=time.time(), **values)
            )

        await self.store.run(fn)


# built once: constructing a statement costs more than running it on SQLite
_SELECT = sa.select(t.tool_calls).where(t.tool_calls.c.idem_key == sa.bindparam("key"))
_SELECT_LOCKED = _SELECT.with_for_update()


def _get(conn: sa.Connection, key: str, *, lock: bool = False) -> CallRecord | None:
    row = conn.execute(_SELECT_LOCKED if lock else _SELECT, {"key": key}).first()
    if row is None:
        return None
    m = row._mapping
    return CallRecord(
        key=m["idem_key"],
        tool=m["tool"],
        version=m["version"],
        args_digest=m["args_digest"],
        status=m["status"],
        result=json.loads(m["result"]) if m["result"] else None,
        error=json.loads(m["error"]) if m["error"] else None,
        started_at=m["started_at"],
        finished_at=m["finished_at"],
    )
