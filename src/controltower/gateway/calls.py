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
from controltower.store.sql import RawSql, SqlStore, dumps

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

    def get_now(self, key: str) -> tuple[CallRecord | None] | None:
        """The call's row read on this thread (SQLite, see ``SqlStore.read_now``); None: use :meth:`get`."""

        def fn(db: Any) -> CallRecord | None:
            cursor = db.execute(_GET.text, {"key": key})
            try:
                return _record(cursor.fetchone())
            finally:
                cursor.close()

        return self.store.read_now(fn)

    @staticmethod
    def get_in(conn: sa.Connection, key: str, *, lock: bool = False) -> CallRecord | None:
        """The call's row inside the caller's transaction; ``lock``: FOR UPDATE (PostgreSQL only)."""
        return _get(conn, key, lock=lock and conn.dialect.name == "postgresql")

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
        call = CallRecordRow(key, tenant, tool, version, digest, run_id, step_key)

        def fn(conn: sa.Connection) -> Claim:
            return self.claim_in(conn, call, retry_in_doubt=retry_in_doubt, approval=approval)

        try:
            return await self.store.run(fn)
        except sa.exc.IntegrityError:  # a concurrent claim of the same key won
            return Claim("in_doubt", await self.get(key))

    @staticmethod
    def claim_in(
        conn: sa.Connection,
        call: CallRecordRow,
        *,
        retry_in_doubt: bool,
        approval: tuple[str, str] | None = None,
        prior: CallRecord | Literal["unread"] | None = "unread",
    ) -> Claim:
        """:meth:`claim` inside the caller's transaction; ``prior``: the row if already read in it.

        A concurrent claim of the same key (another process, PostgreSQL) raises
        ``sa.exc.IntegrityError``, rolling back the caller's transaction.
        """
        key, digest = call.key, call.digest
        if prior == "unread":
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
        now = time.time()
        if prior is None:
            _INSERT(conn, _row(call, "started", None, now, None)).close()
        else:
            _RESTART(conn, {"key": key, "now": now}).close()
        return Claim("claimed")

    async def complete(self, key: str, result: Any) -> None:
        await self._finish(key, "completed", result=dumps(result))

    @staticmethod
    def complete_in(
        conn: sa.Connection, call: CallRecordRow, result: Any, *, text: str | None = None
    ) -> None:
        """Record the result inside the caller's transaction (with its audit record).

        A claimed call's row is updated; an unclaimed one (a read) is inserted completed.
        ``text``: the result already serialised with the store's ``dumps`` (off the store thread).
        """
        now = time.time()
        _UPSERT_COMPLETED(
            conn, _row(call, "completed", dumps(result) if text is None else text, now, now)
        ).close()

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


def _row(
    call: CallRecordRow, status: str, result: str | None, started: float, finished: float | None
) -> dict[str, Any]:
    return {
        "idem_key": call.key,
        "tenant": call.tenant,
        "run_id": call.run_id,
        "step_key": call.step_key,
        "tool": call.tool,
        "version": call.version,
        "args_digest": call.digest,
        "status": status,
        "result": result,
        "started_at": started,
        "finished_at": finished,
    }


# the per-call statements, on the driver's cursor (see RawSql)
_COLUMNS = "idem_key, tool, version, args_digest, status, result, error, started_at, finished_at"
_GET = RawSql(f"SELECT {_COLUMNS} FROM tool_calls WHERE idem_key = :key")
_GET_LOCKED = RawSql(f"SELECT {_COLUMNS} FROM tool_calls WHERE idem_key = :key FOR UPDATE")
_VALUES = """(idem_key, tenant, run_id, step_key, tool, version, args_digest, status, result, started_at,
    finished_at) VALUES (:idem_key, :tenant, :run_id, :step_key, :tool, :version, :args_digest, :status,
    :result, :started_at, :finished_at)"""
_INSERT = RawSql(f"INSERT INTO tool_calls {_VALUES}")
_UPSERT_COMPLETED = RawSql(
    f"""INSERT INTO tool_calls {_VALUES} ON CONFLICT (idem_key) DO UPDATE SET status = excluded.status,
    finished_at = excluded.finished_at, result = excluded.result"""
)
_RESTART = RawSql(
    "UPDATE tool_calls SET status = 'started', error = NULL, started_at = :now, finished_at = NULL "
    "WHERE idem_key = :key"
)


def _get(conn: sa.Connection, key: str, *, lock: bool = False) -> CallRecord | None:
    cursor = (_GET_LOCKED if lock else _GET)(conn, {"key": key})
    row = cursor.fetchone()
    cursor.close()
    return _record(row)


def _record(row: Any) -> CallRecord | None:
    if row is None:
        return None
    idem_key, tool, version, digest, status, result, error, started_at, finished_at = row
    return CallRecord(
        key=idem_key,
        tool=tool,
        version=version,
        args_digest=digest,
        status=status,
        result=json.loads(result) if result else None,
        error=json.loads(error) if error else None,
        started_at=started_at,
        finished_at=finished_at,
    )
