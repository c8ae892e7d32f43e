"""`SqlStore`: the Store protocol written once in SQLAlchemy Core.

Dialect subclasses (sqlite.py, postgres.py) only create the engine and pick
the dialect's ``INSERT .. ON CONFLICT`` construct.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import decimal
import functools
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from controltower.spec.errors import ConflictError, LeaseLostError
from controltower.store import tables as t
from controltower.store.base import (
    RunFilter,
    RunRecord,
    SignalRecord,
    StepRecord,
    WorkflowRecord,
)
from controltower.store.committer import GroupCommitter, RelaxFn, SyncFn

T = TypeVar("T")

PAYLOAD_INLINE_LIMIT = 16 * 1024
_REF = "$payload"


def _default(value: object) -> object:
    if isinstance(value, _dt.datetime | _dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), default=_default, ensure_ascii=False)


class SqlStore:
    """Every call is a job for the group committer; results come back as awaitables."""

    insert: Callable[[sa.Table], Any] = staticmethod(sa.insert)

    def __init__(
        self, url: str, engine: sa.Engine, *, set_sync: SyncFn | None = None, relax_in: RelaxFn | None = None
    ) -> None:
        self.url = url
        self.engine = engine
        self._committer = GroupCommitter(engine, set_sync=set_sync, relax_in=relax_in)

    @property
    def commits(self) -> int:
        return self._committer.batches

    @property
    def relaxed_commits(self) -> int:
        """Commits made without waiting for the disk (every job in them ran with ``durable=False``)."""
        return self._committer.relaxed_batches

    async def migrate(self) -> None:
        from controltower.store.migrate import upgrade

        await self._committer.submit(lambda conn, args: [upgrade(conn)])

    async def close(self) -> None:
        self._committer.close()
        self.engine.dispose()
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    _reader: Any = None

    def read_now(self, fn: Callable[[Any], T]) -> tuple[T] | None:
        """Run the read-only ``fn(sqlite3.Connection)`` on the calling thread; None if it cannot.

        SQLite in WAL mode only (a reader never waits for the writer): a primary-key read costs
        tens of microseconds here, against two thread hand-offs through the store thread. It
        sees what is committed, as any job queued after the commits the caller awaited would.
        ``fn`` must close its cursors (an open one would pin an old snapshot). None on another
        backend, an in-memory database, or a busy database (a checkpoint): use :meth:`run`.
        """
        if self.engine.dialect.name != "sqlite":
            return None
        reader = self._reader
        if reader is None:
            import sqlite3

            path = self.engine.url.database
            if not path or path == ":memory:" or path.startswith("file:"):
                return None
            reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            reader.execute("PRAGMA busy_timeout=20")
            reader.execute("PRAGMA query_only=1")
            self._reader = reader
        try:
            return (fn(reader),)
        except reader.OperationalError:  # busy or locked: the store thread will do it
            return None

    async def _one(self, fn: Callable[[Connection], Any], durable: bool = True) -> Any:
        return await self._committer.submit(lambda conn, _args: [fn(conn)], durable=durable)

    async def run(self, fn: Callable[[Connection], T], *, durable: bool = True) -> T:
        """Run ``fn(conn)`` inside one transaction on the store's thread (for the layers above).

        The transaction is group-committed with other work; if ``fn`` raises, its own work is
        rolled back, the exception reaches the caller, and the other jobs still commit.
        Use ``self.dialect`` for the few statements that differ between SQLite and PostgreSQL.

        ``durable=False``: when this returns, the commit is visible to every connection and
        process, but it may reach the disk only with the next durable commit (an OS crash
        before that loses it, with everything committed after it; a process crash does not).
        For work that is safe to redo after such a loss, e.g. a read tool's budget reservation.
        It is committed durably anyway when batched with a durable job.
        """
        result: T = await self._one(fn, durable)
        return result

    def run_soon(
        self,
        fn: Callable[[Connection], T],
        *,
        durable: bool = True,
        on_commit: Callable[[T], None] | None = None,
        urgent: bool = False,
    ) -> asyncio.Future[T]:
        """:meth:`run`, queued at once: jobs are committed in the order they are queued, so a job
        queued after this one (by any caller) never commits before it. Await the future for the
        result (or the exception). ``on_commit(result)`` runs on the store's thread right after
        the commit, before the future is resolved on the caller's loop. ``urgent``: before the
        jobs already queued (not after them), for work that does not depend on them."""
        future: asyncio.Future[T] = self._committer.submit(
            lambda conn, _args: [fn(conn)], durable=durable, on_commit=on_commit, urgent=urgent
        )
        return future

    @property
    def dialect(self) -> str:
        """'sqlite' or 'postgresql'."""
        return str(self.engine.dialect.name)

    # -- JSON columns, with large values moved to the payload table ---------

    def _encode(self, conn: Connection, value: object, now: float) -> str | None:
        if value is None:
            return None
        text = dumps(value)
        # a value that itself looks like a payload reference is stored as a payload too,
        # so _decode never mistakes user data for a reference
        looks_like_ref = isinstance(value, dict) and len(value) == 1 and _REF in value
        if len(text) <= PAYLOAD_INLINE_LIMIT and not looks_like_ref:
            return text
        digest = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
        stmt = self.insert(t.payloads).values(digest=digest, data=text, size=len(text), created_at=now)
        conn.execute(stmt.on_conflict_do_nothing(index_elements=["digest"]))
        return dumps({_REF: digest})

    @staticmethod
    def _decode(conn: Connection, text: str | None) -> Any:
        if text is None:
            return None
        value = json.loads(text)
        if isinstance(value, dict) and len(value) == 1 and _REF in value:
            data = conn.execute(
                sa.select(t.payloads.c.data).where(t.payloads.c.digest == value[_REF])
            ).scalar_one()
            return json.loads(data)
        return value

    async def get_payload(self, digest: str) -> Any:
        def fn(conn: Connection) -> Any:
            row = conn.execute(
                sa.select(t.payloads.c.data).where(t.payloads.c.digest == digest)
            ).scalar_one_or_none()
            return None if row is None else json.loads(row)

        return await self._one(fn)

    # -- workflows -----------------------------------------------------------

    async def publish(
        self, name: str, spec: dict[str, Any], digest: str, base_dir: str | None, now: float
    ) -> WorkflowRecord:
        def fn(conn: Connection) -> WorkflowRecord:
            existing = conn.execute(
                sa.select(t.workflows)
                .where(t.workflows.c.name == name, t.workflows.c.digest == digest)
                .order_by(t.workflows.c.version.desc())
                .limit(1)
            ).first()
            if existing is not None:
                return _workflow(existing)
            latest = conn.execute(
                sa.select(sa.func.max(t.workflows.c.version)).where(t.workflows.c.name == name)
            ).scalar()
            version = (latest or 0) + 1
            try:
                with conn.begin_nested():
                    conn.execute(
                        t.workflows.insert().values(
                            name=name,
                            version=version,
                            digest=digest,
                            spec=dumps(spec),
                            base_dir=base_dir,
                            created_at=now,
                        )
                    )
            except sa.exc.IntegrityError:
                raise ConflictError(
                    f"workflow {name!r} version {version} was published concurrently",
                    hint="publish again",
                ) from None
            return WorkflowRecord(name, version, digest, spec, base_dir, now)

        result: WorkflowRecord = await self._one(fn)
        return result

    async def get_workflow(self, name: str, version: int | None = None) -> WorkflowRecord | None:
        def fn(conn: Connection) -> WorkflowRecord | None:
            query = sa.select(t.workflows).where(t.workflows.c.name == name)
            if version is not None:
                query = query.where(t.workflows.c.version == version)
            row = conn.execute(query.order_by(t.workflows.c.version.desc()).limit(1)).first()
            return None if row is None else _workflow(row)

        result: WorkflowRecord | None = await self._one(fn)
        return result

    async def list_workflows(self) -> list[WorkflowRecord]:
        def fn(conn: Connection) -> list[WorkflowRecord]:
            rows = conn.execute(sa.select(t.workflows).order_by(t.workflows.c.name, t.workflows.c.version))
            return [_workflow(row) for row in rows]

        result: list[WorkflowRecord] = await self._one(fn)
        return result

    # -- runs ----------------------------------------------------------------

    async def create_run(self, run: RunRecord) -> tuple[RunRecord, bool]:
        def fn(conn: Connection, batch: list[RunRecord]) -> list[tuple[RunRecord, bool]]:
            out: list[tuple[RunRecord, bool]] = []
            plain = [r for r in batch if r.idempotency_key is None]
            if plain:
                conn.execute(t.runs.insert(), [self._run_row(conn, r) for r in plain])
            for r in batch:
                if r.idempotency_key is None:
                    out.append((r, True))
                    continue
                stmt = self.insert(t.runs).values(**self._run_row(conn, r))
                stmt = stmt.on_conflict_do_nothing(
                    index_elements=["tenant", "workflow", "idempotency_key"]
                ).returning(t.runs.c.id)
                if conn.execute(stmt).first() is not None:
                    out.append((r, True))
                    continue
                row = conn.execute(
                    sa.select(t.runs).where(
                        t.runs.c.tenant == r.tenant,
                        t.runs.c.workflow == r.workflow,
                        t.runs.c.idempotency_key == r.idempotency_key,
                    )
                ).one()
                out.append((self._run(conn, row), False))
            return out

        result: tuple[RunRecord, bool] = await self._committer.submit(fn, run, key="create_run")
        return result

    def _run_row(self, conn: Connection, r: RunRecord) -> dict[str, Any]:
        return {
            "id": r.id,
            "tenant": r.tenant,
            "workflow": r.workflow,
            "version": r.version,
            "status": r.status,
            "input": self._encode(conn, r.input, r.created_at),
            "output": self._encode(conn, r.output, r.created_at),
            "error": dumps(r.error) if r.error is not None else None,
            "idempotency_key": r.idempotency_key,
            "parent_run_id": r.parent_run_id,
            "parent_step_key": r.parent_step_key,
            "owner": r.owner,
            "lease_expires_at": r.lease_expires_at,
            "wake_at": r.wake_at,
            "waiting_on": r.waiting_on,
            "cancel_requested": r.cancel_requested,
            "created_at": r.created_at,
            "updated_at": r.updated_at,
            "finished_at": r.finished_at,
        }

    def _run(self, conn: Connection, row: sa.Row[Any]) -> RunRecord:
        m = row._mapping
        return RunRecord(
            id=m["id"],
            tenant=m["tenant"],
            workflow=m["workflow"],
            version=m["version"],
            status=m["status"],
            input=self._decode(conn, m["input"]),
            output=self._decode(conn, m["output"]),
            error=json.loads(m["error"]) if m["error"] else None,
            idempotency_key=m["idempotency_key"],
            parent_run_id=m["parent_run_id"],
            parent_step_key=m["parent_step_key"],
            owner=m["owner"],
            lease_expires_at=m["lease_expires_at"],
            wake_at=m["wake_at"],
            waiting_on=m["waiting_on"],
            cancel_requested=bool(m["cancel_requested"]),
            created_at=m["created_at"],
            updated_at=m["updated_at"],
            finished_at=m["finished_at"],
        )

    async def get_run(self, run_id: str) -> RunRecord | None:
        def fn(conn: Connection, batch: list[str]) -> list[RunRecord | None]:
            rows = conn.execute(_SELECT_RUNS, {"ids": list(set(batch))})
            found = {row.id: self._run(conn, row) for row in rows}
            return [found.get(rid) for rid in batch]

        result: RunRecord | None = await self._committer.submit(fn, run_id, key="get_run")
        return result

    async def list_runs(self, flt: RunFilter) -> list[RunRecord]:
        def fn(conn: Connection) -> list[RunRecord]:
            query = sa.select(t.runs)
            if flt.workflow:
                query = query.where(t.runs.c.workflow == flt.workflow)
            if flt.status:
                query = query.where(t.runs.c.status.in_(list(flt.status)))
            if flt.tenant:
                query = query.where(t.runs.c.tenant == flt.tenant)
            if flt.parent_run_id:
                query = query.where(t.runs.c.parent_run_id == flt.parent_run_id)
            if flt.before_id:
                query = query.where(t.runs.c.id < flt.before_id)
            query = query.order_by(t.runs.c.id.desc()).limit(flt.limit)
            return [self._run(conn, row) for row in conn.execute(query)]

        result: list[RunRecord] = await self._one(fn)
        return result

    async def update_run(self, run_id: str, fields: dict[str, Any]) -> None:
        def fn(conn: Connection) -> None:
            conn.execute(t.runs.update().where(t.runs.c.id == run_id).values(**self._fields(conn, fields)))

        await self._one(fn)

    def _fields(self, conn: Connection, fields: dict[str, Any]) -> dict[str, Any]:
        values = dict(fields)
        now = float(values.get("updated_at") or 0.0)
        for name in ("input", "output"):
            if name in values:
                values[name] = self._encode(conn, values[name], now)
        if "error" in values and values["error"] is not None:
            values["error"] = dumps(values["error"])
        return values

    async def set_run_status(
        self,
        run_id: str,
        status: str,
        now: float,
        *,
        expect: Sequence[str] | None = None,
        extra: dict[str, Any] | None = None,
        owner: str | None = None,
    ) -> bool:
        """Set status (and ``extra`` columns). With ``expect``, only from one of those statuses;
        with ``owner``, only while that owner holds the lease. False when the guard fails."""
        more = extra or {}
        exp = tuple(expect) if expect else None
        columns = tuple(sorted(more))
        fenced = owner is not None

        def fn(conn: Connection, batch: list[dict[str, Any]]) -> list[bool]:
            rows = [self._fields(conn, values) for values in batch]
            stmt = _status_update(columns, exp, fenced)
            if exp is None and not fenced:
                conn.execute(stmt, rows)
                return [True] * len(rows)
            return [conn.execute(stmt, row).rowcount == 1 for row in rows]

        arg = {**more, "_id": run_id, "status": status, "updated_at": now}
        if fenced:
            arg["_owner"] = owner
        key = ("set_run_status", columns, exp, fenced)
        result: bool = await self._committer.submit(fn, arg, key=key)
        return result

    # -- leases --------------------------------------------------------------

    async def claim_run(self, run_id: str, owner: str, now: float, lease: float) -> bool:
        """Take the lease on an active run and mark it running; False if someone else holds it."""

        def fn(conn: Connection, batch: list[str]) -> list[bool]:
            stmt = (
                t.runs.update()
                .where(
                    t.runs.c.id.in_(batch),
                    t.runs.c.status.in_(("pending", "running", "waiting")),
                    sa.or_(
                        t.runs.c.owner.is_(None),
                        t.runs.c.owner == owner,
                        t.runs.c.lease_expires_at < now,
                    ),
                )
                .values(owner=owner, lease_expires_at=now + lease, status="running", wake_at=None)
                .returning(t.runs.c.id)
            )
            claimed = {row[0] for row in conn.execute(stmt)}
            return [rid in claimed for rid in batch]

        # ``now`` is part of the key: merged jobs share this closure, so they must share its time
        result: bool = await self._committer.submit(fn, run_id, key=("claim_run", owner, now, lease))
        return result

    async def claim_ready(self, owner: str, now: float, lease: float, limit: int) -> list[str]:
        def fn(conn: Connection) -> list[str]:
            ready = (
                sa.select(t.runs.c.id)
                .where(
                    t.runs.c.status.in_(("pending", "running", "waiting")),
                    sa.or_(t.runs.c.owner.is_(None), t.runs.c.lease_expires_at < now),
                    sa.or_(t.runs.c.status != "waiting", t.runs.c.wake_at <= now),
                )
                .order_by(t.runs.c.created_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            stmt = (
                t.runs.update()
                .where(t.runs.c.id.in_(ready.scalar_subquery()))
                .values(owner=owner, lease_expires_at=now + lease, status="running", wake_at=None)
                .returning(t.runs.c.id)
            )
            return [row[0] for row in conn.execute(stmt)]

        result: list[str] = await self._one(fn)
        return result

    async def renew_leases(self, owner: str, run_ids: Sequence[str], until: float) -> dict[str, bool]:
        """Extend the leases still held; map each to whether a cancel was requested."""
        ids = list(run_ids)

        def fn(conn: Connection) -> dict[str, bool]:
            held: dict[str, bool] = {}
            for i in range(0, len(ids), 500):
                stmt = (
                    t.runs.update()
                    .where(t.runs.c.owner == owner, t.runs.c.id.in_(ids[i : i + 500]))
                    .values(lease_expires_at=until)
                    .returning(t.runs.c.id, t.runs.c.cancel_requested)
                )
                held.update((row[0], bool(row[1])) for row in conn.execute(stmt))
            return held

        result: dict[str, bool] = await self._one(fn)
        return result

    async def release_run(self, run_id: str, owner: str) -> None:
        def fn(conn: Connection, batch: list[tuple[str, str]]) -> list[None]:
            for rid, who in batch:
                conn.execute(
                    t.runs.update()
                    .where(t.runs.c.id == rid, t.runs.c.owner == who)
                    .values(owner=None, lease_expires_at=None)
                )
            return [None] * len(batch)

        await self._committer.submit(fn, (run_id, owner), key="release_run")

    async def load_state(
        self, run_id: str
    ) -> tuple[RunRecord | None, dict[str, StepRecord], list[SignalRecord]]:
        """The run, its committed steps and its signals, read in one transaction."""

        def fn(conn: Connection, batch: list[str]) -> list[Any]:
            ids = {"ids": list(set(batch))}
            runs = {row.id: self._run(conn, row) for row in conn.execute(_SELECT_RUNS, ids)}
            steps: dict[str, dict[str, StepRecord]] = {}
            for row in conn.execute(_SELECT_STEPS, ids):
                steps.setdefault(row.run_id, {})[row.step_key] = self._step(conn, row)
            signals: dict[str, list[SignalRecord]] = {}
            for row in conn.execute(_SELECT_SIGNALS, ids):
                signals.setdefault(row.run_id, []).append(_signal(row))
            return [(runs.get(rid), steps.get(rid, {}), signals.get(rid, [])) for rid in batch]

        result: tuple[RunRecord | None, dict[str, StepRecord], list[SignalRecord]]
        result = await self._committer.submit(fn, run_id, key="load_state")
        return result

    async def park_run(
        self,
        run_id: str,
        now: float,
        wake_at: float | None,
        waiting_on: str,
        signals: Sequence[str],
        owner: str | None = None,
    ) -> bool:
        """Mark the run waiting and release it; True if one of ``signals`` is already there.

        The check runs in the same transaction, so a signal sent while the run was still
        executing (and so did not see a waiting run to wake) is never missed.
        """

        def fn(conn: Connection, batch: list[Any]) -> list[Any]:
            order = [b[0] for b in batch]
            lost: set[str] = set()
            if owner is not None:
                ids = [b[0] for b in batch]
                held = {row[0] for row in conn.execute(_HELD_RUNS, {"ids": ids, "owner": owner})}
                lost = set(ids) - held
                batch = [b for b in batch if b[0] in held]
            if batch:
                conn.execute(
                    _PARK_RUN,
                    [{"_id": rid, "ts": ts, "wake": wake, "on": on} for rid, ts, wake, on, _ in batch],
                )
            wanted = {(rid, name) for rid, _, _, _, names in batch for name in names}
            found: set[str] = set()
            if wanted:
                rows = conn.execute(
                    _UNCONSUMED_SIGNALS,
                    {
                        "ids": list({rid for rid, _ in wanted}),
                        "names": list({n for _, n in wanted}),
                    },
                )
                found = {row.run_id for row in rows if (row.run_id, row.name) in wanted}
            return [
                LeaseLostError(f"lost the lease on run {rid}; not parked") if rid in lost else rid in found
                for rid in order
            ]

        arg = (run_id, now, wake_at, waiting_on[:500], tuple(signals))
        result: bool = await self._committer.submit(fn, arg, key=("park_run", owner))
        return result

    # -- steps ---------------------------------------------------------------

    async def save_step(self, step: StepRecord, owner: str | None = None) -> None:
        """Upsert a step record; a completed record is never overwritten.

        With ``owner``, the write is fenced: it only lands while ``owner`` holds the run's
        lease, else LeaseLostError (a stalled process must not rewrite a run another took over).
        """
        await self._committer.submit(
            lambda conn, batch: self._save_fenced(conn, batch, owner), step, key=("save_step", owner)
        )

    def _save_fenced(self, conn: Connection, batch: list[StepRecord], owner: str | None) -> list[Any]:
        lost: set[str] = set()
        if owner is not None:
            ids = list({s.run_id for s in batch})
            held = {row[0] for row in conn.execute(_HELD_RUNS, {"ids": ids, "owner": owner})}
            lost = set(ids) - held
        keep = [s for s in batch if s.run_id not in lost]
        if keep:
            rows = [self._step_row(conn, s) for s in keep]
            conn.execute(_UPSERT_STEP[self.insert], rows)
            consumed = [
                {"_sid": s.detail["signal_id"], "ts": s.finished_at or s.started_at}
                for s in keep
                if s.status == "completed" and "signal_id" in s.detail
            ]
            if consumed:
                conn.execute(_CONSUME_SIGNAL, consumed)
        return [
            LeaseLostError(f"lost the lease on run {s.run_id}; step {s.step_key} not recorded")
            if s.run_id in lost
            else None
            for s in batch
        ]

    def _step_row(self, conn: Connection, s: StepRecord) -> dict[str, Any]:
        return {
            "run_id": s.run_id,
            "step_key": s.step_key,
            "step_id": s.step_id,
            "kind": s.kind,
            "status": s.status,
            "attempts": s.attempts,
            "input": self._encode(conn, s.input, s.started_at),
            "output": self._encode(conn, s.output, s.started_at),
            "error": dumps(s.error) if s.error is not None else None,
            "detail": dumps(s.detail) if s.detail else None,
            "started_at": s.started_at,
            "finished_at": s.finished_at,
        }

    async def load_steps(self, run_id: str) -> dict[str, StepRecord]:
        result: dict[str, StepRecord] = await self._one(lambda conn: self._steps(conn, run_id))
        return result

    def _steps(self, conn: Connection, run_id: str) -> dict[str, StepRecord]:
        rows = conn.execute(_SELECT_STEPS, {"ids": [run_id]})
        return {row.step_key: self._step(conn, row) for row in rows}

    def _step(self, conn: Connection, row: sa.Row[Any]) -> StepRecord:
        m = row._mapping
        return StepRecord(
            run_id=m["run_id"],
            step_key=m["step_key"],
            step_id=m["step_id"],
            kind=m["kind"],
            status=m["status"],
            attempts=m["attempts"],
            input=self._decode(conn, m["input"]),
            output=self._decode(conn, m["output"]),
            error=json.loads(m["error"]) if m["error"] else None,
            detail=json.loads(m["detail"]) if m["detail"] else {},
            started_at=m["started_at"],
            finished_at=m["finished_at"],
        )

    async def delete_step(self, run_id: str, step_key: str) -> None:
        def fn(conn: Connection) -> None:
            conn.execute(t.steps.delete().where(t.steps.c.run_id == run_id, t.steps.c.step_key == step_key))

        await self._one(fn)

    async def delete_steps(self, run_id: str, step_keys: Sequence[str]) -> None:
        """Delete several step records in one transaction (all or none)."""
        keys = list(step_keys)

        def fn(conn: Connection) -> None:
            if keys:
                conn.execute(t.steps.delete().where(t.steps.c.run_id == run_id, t.steps.c.step_key.in_(keys)))

        await self._one(fn)

    # -- signals -------------------------------------------------------------

    async def send_signal(self, run_id: str, name: str, payload: Any, now: float) -> int:
        def fn(conn: Connection, batch: list[dict[str, Any]]) -> list[int]:
            ids = [int(conn.execute(_INSERT_SIGNAL, row).scalar_one()) for row in batch]
            # a signal wakes a parked run: the ready query picks up waiting runs with wake_at <= now
            # (each row's own time: merged jobs share the first job's closure)
            conn.execute(_WAKE_RUN, [{"_id": row["run_id"], "ts": row["created_at"]} for row in batch])
            return ids

        row = {"run_id": run_id, "name": name, "payload": dumps(payload), "created_at": now}
        result: int = await self._committer.submit(fn, row, key="signal")
        return result

    @staticmethod
    def signal_in(conn: Connection, run_id: str, name: str, payload: Any, now: float) -> int:
        """Send a signal inside the caller's transaction (atomically with its own writes)."""
        row = {"run_id": run_id, "name": name, "payload": dumps(payload), "created_at": now}
        signal_id = int(conn.execute(_INSERT_SIGNAL, row).scalar_one())
        conn.execute(_WAKE_RUN, {"_id": run_id, "ts": now})
        return signal_id

    async def send_signal_once(self, run_id: str, name: str, payload: Any, now: float) -> int | None:
        row = {"run_id": run_id, "name": name, "payload": dumps(payload), "created_at": now, "once_key": name}

        def fn(conn: Connection) -> int | None:
            seen = conn.execute(
                sa.select(t.signals.c.id).where(t.signals.c.run_id == run_id, t.signals.c.once_key == name)
            ).first()
            if seen is not None:
                return None
            signal_id = int(conn.execute(_INSERT_SIGNAL, row).scalar_one())
            conn.execute(_WAKE_RUN, {"_id": run_id, "ts": now})
            return signal_id

        try:
            result: int | None = await self._one(fn)
        except sa.exc.IntegrityError:  # another process sent it between our check and insert
            return None
        return result

    async def list_signals(self, run_id: str) -> list[SignalRecord]:
        result: list[SignalRecord] = await self._one(lambda conn: _signals(conn, run_id))
        return result

    async def consume_signal(self, signal_id: int, now: float) -> bool:
        def fn(conn: Connection) -> bool:
            stmt = (
                t.signals.update()
                .where(t.signals.c.id == signal_id, t.signals.c.consumed_at.is_(None))
                .values(consumed_at=now)
            )
            return bool(conn.execute(stmt).rowcount == 1)

        result: bool = await self._one(fn)
        return result


def _workflow(row: sa.Row[Any]) -> WorkflowRecord:
    m = row._mapping
    return WorkflowRecord(
        name=m["name"],
        version=m["version"],
        digest=m["digest"],
        spec=json.loads(m["spec"]),
        base_dir=m["base_dir"],
        created_at=m["created_at"],
    )


def _signals(conn: Connection, run_id: str) -> list[SignalRecord]:
    return [_signal(row) for row in conn.execute(_SELECT_SIGNALS, {"ids": [run_id]})]


def _signal(row: sa.Row[Any]) -> SignalRecord:
    return SignalRecord(
        id=row.id,
        run_id=row.run_id,
        name=row.name,
        payload=json.loads(row.payload) if row.payload else None,
        created_at=row.created_at,
        consumed_at=row.consumed_at,
    )


# Statements built once: constructing a statement costs more than running it on SQLite.
_IDS: sa.BindParameter[Any] = sa.bindparam("ids", expanding=True)
_SELECT_RUNS = sa.select(t.runs).where(t.runs.c.id.in_(_IDS))
_SELECT_STEPS = sa.select(t.steps).where(t.steps.c.run_id.in_(_IDS)).order_by(t.steps.c.started_at)
_SELECT_SIGNALS = sa.select(t.signals).where(t.signals.c.run_id.in_(_IDS)).order_by(t.signals.c.id)
_UNCONSUMED_SIGNALS = sa.select(t.signals.c.run_id, t.signals.c.name).where(
    t.signals.c.run_id.in_(_IDS),
    t.signals.c.name.in_(sa.bindparam("names", expanding=True)),
    t.signals.c.consumed_at.is_(None),
)
_PARK_RUN = (
    t.runs.update()
    .where(t.runs.c.id == sa.bindparam("_id"))
    .values(
        status="waiting",
        updated_at=sa.bindparam("ts"),
        wake_at=sa.bindparam("wake"),
        waiting_on=sa.bindparam("on"),
        owner=None,
        lease_expires_at=None,
    )
)
_INSERT_SIGNAL = t.signals.insert().returning(t.signals.c.id)
_WAKE_RUN = (
    t.runs.update()
    .where(t.runs.c.id == sa.bindparam("_id"), t.runs.c.status == "waiting")
    .values(wake_at=sa.bindparam("ts"))
)
_CONSUME_SIGNAL = (
    t.signals.update()
    .where(t.signals.c.id == sa.bindparam("_sid"), t.signals.c.consumed_at.is_(None))
    .values(consumed_at=sa.bindparam("ts"))
)


@functools.lru_cache(maxsize=256)
def _status_update(columns: tuple[str, ...], expect: tuple[str, ...] | None, fenced: bool) -> sa.Update:
    values: dict[str, Any] = {name: sa.bindparam(name) for name in (*columns, "status", "updated_at")}
    stmt = t.runs.update().where(t.runs.c.id == sa.bindparam("_id")).values(**values)
    if expect is not None:
        stmt = stmt.where(t.runs.c.status.in_(expect))
    if fenced:
        stmt = stmt.where(t.runs.c.owner == sa.bindparam("_owner"))
    return stmt


_HELD_RUNS = sa.select(t.runs.c.id).where(t.runs.c.id.in_(_IDS), t.runs.c.owner == sa.bindparam("owner"))


def _upsert_step(insert: Callable[[sa.Table], Any]) -> Any:
    stmt = insert(t.steps)
    update = {
        name: getattr(stmt.excluded, name)
        for name in ("status", "attempts", "input", "output", "error", "detail", "finished_at")
    }
    return stmt.on_conflict_do_update(
        index_elements=["run_id", "step_key"], set_=update, where=t.steps.c.status != "completed"
    )


class _Upserts(dict[Any, Any]):
    def __missing__(self, insert: Callable[[sa.Table], Any]) -> Any:
        self[insert] = stmt = _upsert_step(insert)
        return stmt


_UPSERT_STEP = _Upserts()


# -- hot statements on the driver's cursor -------------------------------------------------


class RawSql:
    """One hot statement, written once in SQL with ``:name`` parameters, run on the DBAPI cursor.

    SQLAlchemy's execute path costs ~0.1 ms of CPU per statement on the store thread, more than
    SQLite takes to run a primary-key statement. The gateway's per-call statements therefore skip
    it: the text is plain SQL valid on SQLite and PostgreSQL (no ``::`` casts, no ``%``), with
    ``:name`` turned into ``%(name)s`` for psycopg once. They run inside the caller's transaction
    (the same DBAPI connection), and driver errors are re-raised as SQLAlchemy's exceptions
    (``sa.exc.IntegrityError``, ``sa.exc.DBAPIError`` with ``orig.sqlstate``), as ``conn.execute``
    would, so callers' retry and conflict handling is unchanged.
    """

    __slots__ = ("pg", "text")

    def __init__(self, text: str) -> None:
        self.text = " ".join(text.split())
        self.pg = _NAMED.sub(r"%(\1)s", self.text)

    def __call__(self, conn: Connection, params: dict[str, Any] | None = None) -> Any:
        """Execute and return the driver's cursor (fetch from it, read ``rowcount``)."""
        dialect = conn.dialect
        sql = self.pg if dialect.name == "postgresql" else self.text
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(sql, params or {})
        except dialect.loaded_dbapi.Error as exc:
            raise sa.exc.DBAPIError.instance(
                sql, params, exc, dialect.loaded_dbapi.Error, dialect=dialect
            ) from exc
        return cursor

    def many(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """Execute once per parameter set (``executemany``)."""
        dialect = conn.dialect
        sql = self.pg if dialect.name == "postgresql" else self.text
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.executemany(sql, rows)
        except dialect.loaded_dbapi.Error as exc:
            raise sa.exc.DBAPIError.instance(
                sql, list(rows), exc, dialect.loaded_dbapi.Error, dialect=dialect
            ) from exc
        finally:
            cursor.close()


_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")
