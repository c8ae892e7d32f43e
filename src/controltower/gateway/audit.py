"""The audit trail: append-only, hash-chained, tamper-evident.

Each record stores ``prev_hash`` (the previous record's hash) and ``hash``, the SHA-256 of
its canonical content including ``seq`` and ``prev_hash``: editing, deleting, moving or
inserting a record breaks the chain there, and :meth:`AuditLog.verify` (or
:func:`verify_jsonl` on an export) says where and how.

There is **one chain per store**, not one per tenant: one global sequence is what lets a
gap prove a deletion, whoever the record belonged to. Concurrent appends are batched into
few transactions; processes sharing PostgreSQL serialise on a transaction-level advisory
lock taken before the tail is read, so the chain never forks (SQLite's ``BEGIN IMMEDIATE``
already serialises writers).

Canonical form, to re-verify an export with any tool: ``sha256(utf8(json.dumps(doc,
sort_keys=True, separators=(",", ":"), ensure_ascii=False)))`` where ``doc`` holds ``v``
(1), ``seq``, ``ts`` as ``"%.6f" % ts``, tenant, actor, kind, subject, run_id, workflow,
outcome, reason, inputs_digest, ``data`` (the object) and ``prev_hash``. ``ts`` is kept
to the microsecond and hashed as that string, so float formatting never matters. The
first record's ``prev_hash`` is 64 zeros.

A chain alone cannot show that the *newest* records were removed, nor a rewrite that
recomputes every later hash: keep an anchor — ``(head_seq, head_hash)`` of an earlier
:class:`VerifyResult` — outside the database and pass it as ``expect_head``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field

from controltower.gateway.secrets import Redactor, default_redactor
from controltower.spec.errors import InvalidInputError
from controltower.store import tables as t
from controltower.store.sql import RawSql, SqlStore, dumps

log = logging.getLogger(__name__)

GENESIS = "0" * 64
Problem = Literal["edited", "deleted", "reordered", "inserted"]
CONTENT_FIELDS: tuple[str, ...] = ("ts", "tenant", "actor", "kind", "subject", "run_id", "workflow")
CONTENT_FIELDS += ("outcome", "reason", "inputs_digest", "data")
_SEARCH_WINDOW = 2048  # how far around a broken record verify looks for where its content belongs


class AuditEvent(BaseModel):
    """Something worth a permanent record: a tool call, a decision, an approval, a control change."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant: str = Field(default="default", min_length=1, max_length=64)
    actor: str = Field(min_length=1, max_length=200)
    kind: str = Field(min_length=1, max_length=40)
    outcome: str = Field(min_length=1, max_length=40)
    subject: str | None = Field(default=None, max_length=300)
    run_id: str | None = Field(default=None, max_length=40)
    workflow: str | None = Field(default=None, max_length=100)
    reason: str | None = None
    inputs_digest: str | None = Field(default=None, max_length=64)
    data: dict[str, Any] = Field(default_factory=dict)
    ts: float | None = Field(default=None, description="Seconds since the epoch; the append time if unset.")


class AuditRecord(AuditEvent):
    """An event as stored: redacted, timestamped, numbered and chained."""

    ts: float
    seq: int
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of walking the chain: ``scanned`` counts every record walked (the whole chain),
    ``checked`` only the requested tenant's (all without one). ``head_seq``/``head_hash`` are the
    last good record: keep them as the anchor (``expect_head``) for the next verification.
    """

    ok: bool
    checked: int
    scanned: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None = None
    problem: Problem | None = None
    message: str = ""


# -- canonical form ----------------------------------------------------------------------


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _canonical_parts(row: Mapping[str, Any], data_text: str) -> tuple[str, str, str]:
    """The canonical text of a record around its ``prev_hash`` and ``seq``, which only the store
    thread knows: ``head + json(prev_hash) + middle + str(seq) + end`` is exactly
    ``_canonical(doc)`` of :func:`compute_hash` (keys in sorted order, ``data`` already canonical)."""

    def j(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    head = (
        f'{{"actor":{j(row["actor"])},"data":{data_text},"inputs_digest":{j(row["inputs_digest"])},'
        f'"kind":{j(row["kind"])},"outcome":{j(row["outcome"])},"prev_hash":'
    )
    middle = f',"reason":{j(row["reason"])},"run_id":{j(row["run_id"])},"seq":'
    ts = f"{float(row['ts']):.6f}"
    end = (
        f',"subject":{j(row["subject"])},"tenant":{j(row["tenant"])},"ts":"{ts}","v":1,'
        f'"workflow":{j(row["workflow"])}}}'
    )
    return head, middle, end


def compute_hash(fields: Mapping[str, Any]) -> str:
    """The hash of a record given its fields (``data`` as an object, not text)."""
    doc = {name: fields[name] for name in CONTENT_FIELDS}
    doc.update(v=1, ts=f"{float(fields['ts']):.6f}", seq=int(fields["seq"]), prev_hash=fields["prev_hash"])
    return hashlib.sha256(_canonical(doc).encode("utf-8")).hexdigest()


# -- the log -----------------------------------------------------------------------------

Listener = Callable[[AuditRecord], object]  # may return an awaitable, which is awaited
Filter = str | float | None


@dataclass(slots=True)
class _Pending:
    rows: list[dict[str, Any]]
    future: asyncio.Future[list[AuditRecord]]


class AuditLog:
    """Appends to, queries, verifies and exports the audit chain of one store.

    Concurrent :meth:`append` calls are queued and written together: while one batch is
    in its transaction the next one gathers, so throughput grows with concurrency. An
    append whose caller is cancelled is still written — an audit trail must not lose
    events because somebody stopped waiting. Use one instance per event loop.
    """

    def __init__(self, store: SqlStore, *, redactor: Redactor | None = None, max_batch: int = 1000) -> None:
        self.store = store
        self.redactor = redactor if redactor is not None else default_redactor()
        self.max_batch = max_batch
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(record)`` after each record commits (the governance monitor uses this).

        Listeners run in the appender's task once its records are durable; an exception in
        one is logged, never raised to the appender: the record is already written.
        """
        self._listeners.append(listener)

    async def publish(self, records: Iterable[AuditRecord]) -> None:
        """Hand committed records to the listeners (call it after :meth:`append_in`)."""
        for record in records:
            for listener in list(self._listeners):
                try:
                    result = listener(record)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception("audit listener %r failed on record %s", listener, record.seq)

    async def append(self, event: AuditEvent) -> AuditRecord:
        (record,) = await self.append_many([event])
        return record

    async def append_many(self, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        """Append ``events`` as consecutive records (nothing else is interleaved between them)."""
        rows = [self._prepare(event) for event in events]
        if not rows:
            return []
        loop = asyncio.get_running_loop()
        pending = _Pending(rows, loop.create_future())
        self._pending.append(pending)
        if self._flusher is None or self._flusher.done() or self._flusher.get_loop() is not loop:
            self._flusher = loop.create_task(self._flush(), name="audit-flush")
        records = await pending.future
        if self._listeners:
            await self.publish(records)
        return records

    def append_in(self, conn: sa.Connection, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        """Append inside a ``store.run`` job of the caller, atomically with its other writes.

        Call :meth:`publish` with the result once ``store.run`` has returned. Prefer
        :meth:`prepare` before ``store.run`` and :meth:`append_prepared_in` inside it: the
        redaction and serialisation then stay off the store thread.
        """
        return self._write(conn, [self._prepare(event) for event in events])

    def prepare(self, events: Sequence[AuditEvent]) -> list[dict[str, Any]]:
        """Redact, serialise and pre-hash ``events`` (anywhere: it touches no database)."""
        return [self._prepare(event) for event in events]

    def append_prepared_in(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> list[AuditRecord]:
        """Chain and insert rows from :meth:`prepare` inside the caller's transaction."""
        return self._write(conn, rows)

    def _prepare(self, event: AuditEvent) -> dict[str, Any]:
        """Redact and normalise before hashing: what is hashed is exactly what is stored."""
        ts = event.ts if event.ts is not None else time.time()
        if not math.isfinite(ts):
            raise InvalidInputError("audit event ts must be a finite number of seconds since the epoch")
        try:
            data = self.redactor.redact(event.data)
            try:
                text = _canonical(data)
            except TypeError:  # dates, decimals, models...: the store's JSON conventions
                text = _canonical(json.loads(dumps(data)))
        except (TypeError, ValueError) as exc:
            msg = f"audit event data must be JSON without NaN or infinity ({exc}): convert such values first"
            raise InvalidInputError(msg) from None
        row = event.model_dump(exclude={"ts", "data"})
        row.update(ts=round(ts, 6), data=json.loads(text), _text=text)
        if event.reason is not None:
            row["reason"] = self.redactor.redact_text(event.reason)
        row["_canon"] = _canonical_parts(row, text)
        return row

    async def _flush(self) -> None:
        """Drain the queue, one transaction per batch, until nothing is waiting."""
        batch: list[_Pending] = []
        try:
            while self._pending:
                batch, size = [], 0
                while self._pending and (not batch or size + len(self._pending[0].rows) <= self.max_batch):
                    size += len(self._pending[0].rows)
                    batch.append(self._pending.pop(0))
                result = await self._try_write([row for pending in batch for row in pending.rows])
                if isinstance(result, Exception):
                    for pending in batch:  # alone, or isolate the bad append: the others still commit
                        _settle(
                            pending.future, result if len(batch) == 1 else await self._try_write(pending.rows)
                        )
                    continue
                for pending in batch:
                    _settle(pending.future, result[: len(pending.rows)])
                    del result[: len(pending.rows)]
        except BaseException:  # cancelled with the loop: nobody may wait forever
            for pending in [*batch, *self._pending]:
                pending.future.cancel()
            self._pending.clear()
            raise

    async def _try_write(self, rows: list[dict[str, Any]]) -> list[AuditRecord] | Exception:
        def job(conn: sa.Connection) -> list[AuditRecord]:
            return self._write(conn, rows)

        try:
            try:
                return await self.store.run(job)
            except sa.exc.IntegrityError:  # a writer that skipped the lock took our seq: chain again
                return await self.store.run(job)
        except Exception as exc:
            return exc

    def _write(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> list[AuditRecord]:
        """Lock, read the tail, chain and insert. Runs again from scratch after a rollback."""
        if not rows:
            return []
        if conn.dialect.name == "postgresql":
            # read committed: the tail query below, run after the lock, sees every committed append
            _PG_LOCK_RAW(conn).close()
        cursor = _TAIL_RAW(conn)
        tail = cursor.fetchone()
        cursor.close()
        seq, prev = (int(tail[0]), str(tail[1])) if tail is not None else (0, GENESIS)
        inserts: list[dict[str, Any]] = []
        records: list[AuditRecord] = []
        for row in rows:
            seq += 1
            fields = {k: v for k, v in row.items() if k[0] != "_"}
            fields.update(seq=seq, prev_hash=prev)
            head, middle, end = row.get("_canon") or _canonical_parts(row, row["_text"])
            text = f'{head}"{prev}"{middle}{seq}{end}'
            prev = hashlib.sha256(text.encode("utf-8")).hexdigest()
            inserts.append({**fields, "data": row["_text"], "hash": prev})
            records.append(AuditRecord.model_construct(**fields, hash=prev))
        _INSERT_RAW.many(conn, inserts)
        return records

    async def query(
        self,
        tenant: str,
        *,
        run_id: str | None = None,
        kind: str | None = None,
        actor: str | None = None,
        workflow: str | None = None,
        since: float | None = None,
        until: float | None = None,
        after_seq: int = 0,
        limit: int = 100,
    ) -> list[AuditRecord]:
        """One tenant's records in chain order; page with ``after_seq`` = the last seq seen.

        ``since`` is inclusive, ``until`` exclusive (seconds since the epoch).
        """
        if limit < 1:
            raise InvalidInputError("limit must be at least 1")
        filters = {"run_id": run_id, "kind": kind, "actor": actor, "workflow": workflow}
        stmt = _filtered(after_seq, tenant=tenant, since=since, until=until, **filters).limit(limit)
        return await self.store.run(lambda conn: [_record(row) for row in conn.execute(stmt)])

    async def export_jsonl(
        self, target: str | Path | IO[str], *, after_seq: int = 0, chunk: int = 5000, **filters: Filter
    ) -> int:
        """Write matching records, one JSON object per line in chain order; returns how many.

        ``filters`` are those of :meth:`query` (``tenant`` optional here). Unfiltered, the
        file is the complete chain and :func:`verify_jsonl` checks every link; a filtered
        export can still be checked record by record (``contiguous=False``).
        """
        _filtered(0, **filters)  # reject unknown filters before creating the file
        count = 0
        with _output(target) as stream:
            async for page in self._pages(after_seq, chunk, **filters):
                stream.write("".join(_canonical(_record(row).model_dump(mode="json")) + "\n" for row in page))
                count += len(page)
        return count

    async def _pages(self, after_seq: int, chunk: int, **filters: Filter) -> AsyncIterator[list[sa.Row[Any]]]:
        """Matching rows in seq order, ``chunk`` at a time: never the whole table in memory."""
        while True:
            stmt = _filtered(after_seq, **filters).limit(chunk)

            def job(conn: sa.Connection, stmt: sa.Select[Any] = stmt) -> list[sa.Row[Any]]:
                return list(conn.execute(stmt).all())

            page = await self.store.run(job)
            if not page:
                return
            yield page
            after_seq = int(page[-1].seq)

    async def verify(
        self, tenant: str | None = None, *, expect_head: tuple[int, str] | None = None, chunk: int = 5000
    ) -> VerifyResult:
        """Walk the whole chain in chunks of ``chunk`` records and report the first break.

        The chain is global, so the walk always covers every tenant's records: a deleted
        or edited record cannot be attributed to a tenant (the tenant column may be what
        was changed), so any break fails verification for everyone. ``tenant`` narrows
        ``checked`` to that tenant's records; messages name seq numbers, never contents.
        """
        walk = _Walk(tenant, contiguous=True, expect_head=expect_head)
        async for page in self._pages(-(2**63), chunk):  # from the very bottom: seq 0 or below is a forgery
            bad = await asyncio.to_thread(walk.feed_all, page)  # hashing: keep it off the event loop
            if bad is not None:
                return await self.store.run(functools.partial(_explain_in_db, walk, bad))
        return walk.finish()


def _explain_in_db(walk: _Walk, bad: _Bad, conn: sa.Connection) -> VerifyResult:
    return walk.explain(bad, _db_lookup(conn))


@contextlib.contextmanager
def _output(target: str | Path | IO[str]) -> Iterator[IO[str]]:
    if not isinstance(target, str | Path):
        yield target
        target.flush()
        return
    with Path(target).open("w", encoding="utf-8") as stream:
        yield stream


def _settle(future: asyncio.Future[list[AuditRecord]], value: list[AuditRecord] | Exception) -> None:
    if future.done():  # the appender was cancelled; the records were written all the same
        return
    if isinstance(value, Exception):
        future.set_exception(value)
    else:
        future.set_result(value)


# the per-append statements, on the driver's cursor (see RawSql)
_TAIL_RAW = RawSql("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
# "AUDT"; the second key is the schema, so stores in separate schemas do not contend
_PG_LOCK_RAW = RawSql(f"SELECT pg_advisory_xact_lock({0x41554454}, hashtext(CAST(current_schema() AS TEXT)))")
_COLUMNS = ("seq", *CONTENT_FIELDS, "prev_hash", "hash")
_INSERT_RAW = RawSql(
    f"INSERT INTO audit ({', '.join(_COLUMNS)}) VALUES ({', '.join(':' + c for c in _COLUMNS)})"
)
_EQUALS = ("tenant", "run_id", "kind", "actor", "workflow")


def _filtered(
    after_seq: int, *, since: Filter = None, until: Filter = None, **equals: Filter
) -> sa.Select[Any]:
    c = t.audit.c
    unknown = set(equals) - set(_EQUALS)
    if unknown:
        raise InvalidInputError(f"unknown audit filter(s) {sorted(unknown)}; use {_EQUALS}, since or until")
    stmt = sa.select(t.audit).where(c.seq > after_seq).order_by(c.seq)
    for name, value in equals.items():
        if value is not None:
            stmt = stmt.where(c[name] == value)
    if since is not None:
        stmt = stmt.where(c.ts >= since)
    if until is not None:
        stmt = stmt.where(c.ts < until)
    return stmt


def _record(row: sa.Row[Any]) -> AuditRecord:
    fields = dict(row._mapping)
    fields["data"] = json.loads(fields["data"]) if fields["data"] else {}
    return AuditRecord.model_construct(**fields)


_UNREADABLE = object()  # stands in for data that is not JSON: it can never hash, so it is "edited"


def _raw(row: sa.Row[Any]) -> dict[str, Any]:
    fields = dict(row._mapping)
    try:
        fields["data"] = json.loads(fields["data"]) if fields["data"] is not None else None
    except ValueError:
        fields["data"] = _UNREADABLE
    return fields


def _try_hash(fields: Mapping[str, Any], seq: int) -> str | None:
    if fields.get("data") is _UNREADABLE:
        return None
    try:
        return compute_hash({**fields, "seq": seq})
    except (KeyError, TypeError, ValueError):
        return None


# -- verification ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Bad:
    """Where the walk stopped; :meth:`_Walk.explain` turns it into a verdict."""

    kind: Literal["gap", "backwards", "mismatch", "link", "anchor", "malformed"]
    seq: int
    row: dict[str, Any] | None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class _Lookup:
    """Random access to the chain being verified, used only to explain a break."""

    fetch: Callable[[int], dict[str, Any] | None]
    seq_of_hash: Callable[[str], int | None]


def _db_lookup(conn: sa.Connection) -> _Lookup:
    def fetch(seq: int) -> dict[str, Any] | None:
        row = conn.execute(sa.select(t.audit).where(t.audit.c.seq == seq)).first()
        return None if row is None else _raw(row)

    by_hash = sa.select(t.audit.c.seq).where(t.audit.c.hash == sa.bindparam("h")).limit(1)
    return _Lookup(fetch, lambda digest: conn.execute(by_hash, {"h": digest}).scalar())


def _file_lookup(path: Path) -> _Lookup:
    """Re-reads the export for each lookup; only ever used on the failure path."""

    def scan() -> Iterator[dict[str, Any]]:
        with path.open(encoding="utf-8") as stream:
            yield from (row for row, _problem in _parse_lines(stream) if row is not None)

    return _Lookup(
        lambda seq: next((row for row in scan() if row.get("seq") == seq), None),
        lambda digest: next((int(row["seq"]) for row in scan() if row.get("hash") == digest), None),
    )


class _Walk:
    """Streaming chain check: holds only the previous record's seq and hash."""

    def __init__(self, tenant: str | None, *, contiguous: bool, expect_head: tuple[int, str] | None) -> None:
        self.tenant = tenant
        self.contiguous = contiguous
        self.expect_head = expect_head
        self.prev_seq, self.prev_hash = 0, GENESIS
        self.checked = self.scanned = 0

    def feed_all(self, rows: Iterable[sa.Row[Any]]) -> _Bad | None:
        for row in rows:
            bad = self.feed(_raw(row))
            if bad is not None:
                return bad
        return None

    def feed(self, row: dict[str, Any]) -> _Bad | None:
        seq = row["seq"]
        if not isinstance(seq, int) or seq <= self.prev_seq:
            return _Bad("backwards", seq if isinstance(seq, int) else self.prev_seq + 1, row)
        expected = self.prev_seq + 1
        if seq > expected and self.contiguous:
            return _Bad("gap", expected, row)
        if _try_hash(row, seq) != row.get("hash"):
            return _Bad("mismatch", seq, row)
        if seq == expected and row["prev_hash"] != self.prev_hash:
            return _Bad("link", seq, row)
        if self.expect_head is not None and seq == self.expect_head[0] and row["hash"] != self.expect_head[1]:
            return _Bad("anchor", seq, row)
        self.prev_seq, self.prev_hash = seq, row["hash"]
        self.scanned += 1
        if self.tenant is None or row.get("tenant") == self.tenant:
            self.checked += 1
        return None

    def _result(self, problem: Problem | None = None, seq: int | None = None, msg: str = "") -> VerifyResult:
        return VerifyResult(
            ok=problem is None,
            checked=self.checked,
            scanned=self.scanned,
            head_seq=self.prev_seq,
            head_hash=self.prev_hash,
            first_bad_seq=seq,
            problem=problem,
            message=msg or f"{self.scanned} record(s) form an unbroken chain",
        )

    def finish(self) -> VerifyResult:
        if self.expect_head is not None and self.prev_seq < self.expect_head[0]:
            return self._result(
                "deleted",
                self.prev_seq + 1,
                f"the chain ends at seq {self.prev_seq} but the anchor says it reached seq "
                f"{self.expect_head[0]}: the newest records were removed",
            )
        return self._result()

    def explain(self, bad: _Bad, lookup: _Lookup) -> VerifyResult:
        s, row = bad.seq, bad.row
        if bad.kind != "mismatch" or row is None:
            last = int(row["seq"]) - 1 if bad.kind == "gap" and row else s
            moved = bad.kind == "gap" and lookup.fetch(s) is not None  # only possible in a file
            relink = f"record {s} does not link to record {s - 1}: record {s - 1} was changed and its hash "
            relink += f"recomputed (or record {s} was forged)"
            verdicts: dict[str, tuple[Problem, int, str]] = {
                "malformed": ("edited", s, bad.detail),
                "backwards": ("inserted", s, f"a record numbered {s} follows {self.prev_seq}: inserted"),
                "gap": ("reordered", s, f"record {s} is out of place")
                if moved
                else ("deleted", s, f"record(s) {s}..{last} are missing from the chain"),
                "anchor": ("edited", s, f"record {s} no longer matches the anchor: the chain was rewritten"),
                "link": ("edited", s - 1, relink) if s > 1 else ("edited", 1, "record 1 is not the genesis"),
            }
            return self._result(*verdicts[bad.kind])
        home = _find_home(row, s, lookup)
        partner = lookup.fetch(home) if home is not None else None
        if home is None:
            return self._result("edited", s, f"record {s} does not match its hash: its content was changed")
        if home > s:
            if partner is not None and _try_hash(partner, s) == partner.get("hash"):
                return self._result("reordered", s, f"records {s} and {home} swapped places")
            return self._result("deleted", s, f"record {s} holds record {home}: records removed, renumbered")
        if partner is not None and partner.get("hash") == row.get("hash"):
            return self._result("inserted", s, f"record {s} is a copy of record {home}")
        return self._result("inserted", home, f"records {home}..{s - 1} inserted; record {home} is now {s}")


def _find_home(row: dict[str, Any], seq: int, lookup: _Lookup) -> int | None:
    """The seq at which ``row``'s content and stored hash agree, searched near ``seq``."""
    digest = row.get("hash")
    if not isinstance(digest, str) or row.get("data") is _UNREADABLE:
        return None
    candidates = [n + 1 for n in [lookup.seq_of_hash(row["prev_hash"])] if n is not None]
    candidates += [c for d in range(1, _SEARCH_WINDOW + 1) for c in (seq + d, seq - d) if c >= 1]
    for candidate in candidates:
        if candidate != seq and _try_hash(row, candidate) == digest:
            return candidate
    return None


_REQUIRED = ("seq", *CONTENT_FIELDS, "prev_hash", "hash")


def _parse_lines(stream: IO[str]) -> Iterator[tuple[dict[str, Any] | None, str]]:
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            yield None, f"line {number} is not valid JSON"
            continue
        if not isinstance(row, dict) or any(name not in row for name in _REQUIRED):
            yield None, f"line {number} is not an audit record (fields are missing)"
            continue
        yield row, ""


def verify_jsonl(
    path: str | Path,
    *,
    contiguous: bool = True,
    tenant: str | None = None,
    expect_head: tuple[int, str] | None = None,
) -> VerifyResult:
    """Verify an export offline, streaming it line by line.

    A complete export (the default, ``contiguous=True``) must start at seq 1 and every
    link is checked. For a filtered export (one tenant, one run) pass ``contiguous=False``:
    each record's own hash is checked, and links wherever consecutive seqs are present.
    """
    file = Path(path)
    walk = _Walk(tenant, contiguous=contiguous, expect_head=expect_head)
    with file.open(encoding="utf-8") as stream:
        for row, problem in _parse_lines(stream):
            bad = _Bad("malformed", walk.prev_seq + 1, None, problem) if row is None else walk.feed(row)
            if bad is not None:
                return walk.explain(bad, _file_lookup(file))
    return walk.finish()
