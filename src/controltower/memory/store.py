"""Long-term memory per (tenant, workflow, namespace), kept in the store.

Entries are JSON values under a key, with an optional time to live and optional subject tags
(who the entry is about: a customer id, an e-mail). Expired entries are invisible at once and
removed by :meth:`Memory.purge_expired`; :meth:`Memory.forget_subject` erases everything about
a subject across a tenant's workflows (GDPR-style erasure).

Semantic search embeds the query and scores it by cosine against every live entry of the
view's scope, exactly (brute force, no approximate index; scoring runs in a worker thread):
tens of milliseconds per thousand entries, fine for the thousands of examples and notes a
workflow keeps, not for millions. Every query is filtered by tenant and workflow first, so
one tenant never sees another's memory.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import heapq
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from controltower.memory.embeddings import Embedder, default_embedder, dot, pack, unpack
from controltower.memory.knn import Prediction, vote
from controltower.spec.errors import InvalidInputError
from controltower.store import tables as t
from controltower.store.sql import SqlStore, dumps

if TYPE_CHECKING:
    from controltower.gateway.audit import AuditLog

ReadRecorder = Callable[[str, str, str | None, str | None], None]

MAX_VALUE_BYTES = 256 * 1024
MAX_K = 1000
_LIMITS = {"tenant": 64, "workflow": 100, "namespace": 100, "key": 300, "subject": 200}
_E = t.memory_entries
_S = t.memory_subjects


@dataclass(frozen=True, slots=True)
class MemoryEntry:
    tenant: str
    workflow: str
    namespace: str
    key: str
    value: Any
    digest: str
    created_at: float
    updated_at: float
    expires_at: float | None = None
    text: str | None = None
    subjects: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        """How provenance names this entry (tenant and workflow are the run's own)."""
        return f"{self.namespace}/{self.key}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "workflow": self.workflow,
            "namespace": self.namespace,
            "key": self.key,
            "value": self.value,
            "text": self.text,
            "subjects": list(self.subjects),
            "digest": self.digest,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "expires_at": self.expires_at,
        }


@dataclass(frozen=True, slots=True)
class MemoryHit:
    entry: MemoryEntry
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"score": round(self.score, 6), **self.entry.to_dict()}


def value_digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"memory {kind} must be a non-empty string", hint=f"got {value!r}")
    if len(value) > _LIMITS[kind]:
        raise InvalidInputError(f"memory {kind} is longer than {_LIMITS[kind]} characters: {value[:40]!r}...")
    return value


def _text_of(value: Any) -> str | None:
    """What gets embedded when no ``text`` is given: a string as is, else a ``text`` field."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("text"), str):
        return str(value["text"])
    return None


def _matches(value: Any, where: Mapping[str, Any]) -> bool:
    return isinstance(value, Mapping) and all(k in value and value[k] == v for k, v in where.items())


@dataclass
class Memory:
    """The memory service of one store; :meth:`view` binds it to a tenant and a workflow.

    With an ``audit`` log, every erasure by subject is recorded without the erased data: the
    subject's SHA-256 digest (pseudonymous, so a later request can be matched to its record)
    and the number of entries.
    """

    store: SqlStore
    embedder: Embedder | None = None
    audit: AuditLog | None = None
    clock: Callable[[], float] = field(default=time.time, repr=False)

    def get_embedder(self) -> Embedder:
        """The configured embedder, else the default (``TOWER_EMBEDDER``), chosen once."""
        if self.embedder is None:
            self.embedder = default_embedder()
        return self.embedder

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        embedder = self.get_embedder()
        if not texts:
            return []
        return await asyncio.to_thread(embedder.embed, list(texts))

    def view(
        self,
        tenant: str,
        workflow: str,
        namespace: str = "default",
        *,
        on_read: ReadRecorder | None = None,
    ) -> MemoryView:
        return MemoryView(
            self, _name("tenant", tenant), _name("workflow", workflow), _name("namespace", namespace), on_read
        )

    async def purge_expired(self, *, tenant: str | None = None) -> int:
        """Delete entries whose time to live has passed; returns how many."""
        now = self.clock()

        def fn(conn: Connection) -> int:
            cond = sa.and_(_E.c.expires_at.is_not(None), _E.c.expires_at <= now)
            if tenant is not None:
                cond = sa.and_(cond, _E.c.tenant == tenant)
            conn.execute(_S.delete().where(sa.exists(sa.select(1).where(_same_entry(), cond))))
            return int(conn.execute(_E.delete().where(cond)).rowcount or 0)

        return await self.store.run(fn)

    async def forget_subject(self, tenant: str, subject: str, *, by: str = "system") -> int:
        """Erase every entry of ``tenant`` tagged with ``subject``, in every workflow and namespace.

        Returns how many entries were erased; audited when the service has an audit log.
        """
        tenant, subject = _name("tenant", tenant), _name("subject", subject)

        def fn(conn: Connection) -> int:
            tagged = sa.exists(sa.select(1).where(_same_entry(), _S.c.subject == subject))
            erased = int(conn.execute(_E.delete().where(_E.c.tenant == tenant, tagged)).rowcount or 0)
            # the erased entries' other tags go too (rows whose entry no longer exists)
            orphan = ~sa.exists(sa.select(1).where(_same_entry()))
            conn.execute(_S.delete().where(_S.c.tenant == tenant, orphan))
            return erased

        erased = await self.store.run(fn)
        if self.audit is not None:
            from controltower.gateway.audit import AuditEvent

            digest = hashlib.sha256(subject.encode()).hexdigest()
            await self.audit.append(
                AuditEvent(
                    tenant=tenant,
                    actor=by,
                    kind="memory_erasure",
                    outcome="erased",
                    subject=f"subject-sha256:{digest[:16]}",
                    inputs_digest=digest,
                    data={"entries": erased},
                )
            )
        return erased

    async def scopes(self, tenant: str) -> list[tuple[str, str, int]]:
        """(workflow, namespace, live entries) for every scope of ``tenant`` that holds memory."""
        now = self.clock()

        def fn(conn: Connection) -> list[tuple[str, str, int]]:
            stmt = (
                sa.select(_E.c.workflow, _E.c.namespace, sa.func.count())
                .where(_E.c.tenant == tenant, _live(now))
                .group_by(_E.c.workflow, _E.c.namespace)
                .order_by(_E.c.workflow, _E.c.namespace)
            )
            return [(row[0], row[1], int(row[2])) for row in conn.execute(stmt)]

        return await self.store.run(fn)


class MemoryView:
    """One scope of memory: a tenant's workflow (and a namespace inside it, ``default`` unless
    chosen). Reads report themselves to ``on_read`` (the step context's provenance).
    """

    def __init__(
        self, memory: Memory, tenant: str, workflow: str, namespace: str, on_read: ReadRecorder | None
    ) -> None:
        self.memory = memory
        self.tenant = tenant
        self.workflow = workflow
        self.namespace = namespace
        self._on_read = on_read

    def __repr__(self) -> str:
        return f"MemoryView(tenant={self.tenant!r}, workflow={self.workflow!r}, namespace={self.namespace!r})"

    def in_namespace(self, namespace: str) -> MemoryView:
        """The same tenant and workflow, another namespace (e.g. ``examples``, ``customers``)."""
        return MemoryView(
            self.memory, self.tenant, self.workflow, _name("namespace", namespace), self._on_read
        )

    # -- writes --------------------------------------------------------------------------

    async def put(
        self,
        key: str,
        value: Any,
        *,
        text: str | None = None,
        ttl: float | None = None,
        subjects: Sequence[str] = (),
        embed: bool = True,
    ) -> MemoryEntry:
        """Store ``value`` (any JSON value) under ``key``, replacing what was there.

        ``text`` is what semantic search matches (default: the value if it is a string, else its
        ``text`` field; without either the entry is found by key only). ``ttl`` is in seconds.
        ``subjects`` tag who the entry is about, for :meth:`Memory.forget_subject`. A put is an
        upsert, so a retried step that writes the same key again is harmless.
        """
        key = _name("key", key)
        try:
            body = dumps(value)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"memory value for {key!r} is not JSON: {exc}") from None
        if len(body.encode()) > MAX_VALUE_BYTES:
            raise InvalidInputError(
                f"memory value for {key!r} is {len(body.encode())} bytes; the limit is {MAX_VALUE_BYTES}",
                hint="store a reference (a document id) instead of the document",
            )
        if ttl is not None and not ttl > 0:
            raise InvalidInputError(f"ttl must be a positive number of seconds, got {ttl!r}")
        tags = tuple(dict.fromkeys(_name("subject", s) for s in subjects))
        if text is None:
            text = _text_of(value)
        vector, embedder_name = None, None
        if embed and text:
            (vec,) = await self.memory.embed([text])
            vector, embedder_name = pack(vec), self.memory.get_embedder().name
        now = self.memory.clock()
        stored = json.loads(body)
        digest = value_digest(stored)
        expires_at = now + ttl if ttl is not None else None
        row = {
            "tenant": self.tenant,
            "workflow": self.workflow,
            "namespace": self.namespace,
            "key": key,
            "value": body,
            "text": text,
            "subjects": dumps(list(tags)) if tags else None,
            "digest": digest,
            "embedder": embedder_name,
            "vector": vector,
            "created_at": now,
            "updated_at": now,
            "expires_at": expires_at,
        }
        store = self.memory.store

        def fn(conn: Connection) -> float:
            stmt = store.insert(_E).values(**row)
            update = {c: stmt.excluded[c] for c in row if c not in ("tenant", "workflow", "namespace", "key")}
            # an entry that had expired starts a new life: its creation time is now
            update["created_at"] = sa.case(
                (sa.and_(_E.c.expires_at.is_not(None), _E.c.expires_at <= now), stmt.excluded.created_at),
                else_=_E.c.created_at,
            )
            upsert = stmt.on_conflict_do_update(
                index_elements=["tenant", "workflow", "namespace", "key"], set_=update
            )
            created: float = conn.execute(upsert.returning(_E.c.created_at)).scalar_one()
            _delete_subject_rows(conn, self.tenant, self.workflow, self.namespace, key)
            if tags:
                conn.execute(
                    _S.insert(),
                    [
                        {
                            "tenant": self.tenant,
                            "subject": s,
                            "workflow": self.workflow,
                            "namespace": self.namespace,
                            "key": key,
                        }
                        for s in tags
                    ],
                )
            return created

        created_at = await store.run(fn)
        return MemoryEntry(
            self.tenant,
            self.workflow,
            self.namespace,
            key,
            stored,
            digest,
            created_at,
            now,
            expires_at,
            text,
            tags,
        )

    async def delete(self, key: str) -> bool:
        """Delete one entry; True if it existed (expired or not)."""
        key = _name("key", key)

        def fn(conn: Connection) -> bool:
            _delete_subject_rows(conn, self.tenant, self.workflow, self.namespace, key)
            cond = _entry_cond(self.tenant, self.workflow, self.namespace, key)
            return bool(conn.execute(_E.delete().where(cond)).rowcount)

        return await self.memory.store.run(fn)

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every entry whose key starts with ``prefix`` ("" clears the namespace)."""
        if not isinstance(prefix, str):
            raise InvalidInputError("prefix must be a string")

        def fn(conn: Connection) -> int:
            conn.execute(
                _S.delete().where(
                    _S.c.tenant == self.tenant,
                    _S.c.workflow == self.workflow,
                    _S.c.namespace == self.namespace,
                    _S.c.key.startswith(prefix, autoescape=True),
                )
            )
            stmt = _E.delete().where(self._scope(), _E.c.key.startswith(prefix, autoescape=True))
            return int(conn.execute(stmt).rowcount or 0)

        return await self.memory.store.run(fn)

    async def forget_subject(self, subject: str, *, by: str = "system") -> int:
        """Erase everything this tenant keeps about ``subject``, in every workflow (not only this one)."""
        return await self.memory.forget_subject(self.tenant, subject, by=by)

    # -- reads ---------------------------------------------------------------------------

    async def get(self, key: str, default: Any = None) -> Any:
        entry = await self.get_entry(key)
        return default if entry is None else entry.value

    async def get_entry(self, key: str) -> MemoryEntry | None:
        key = _name("key", key)
        now = self.memory.clock()
        stmt = sa.select(*_COLUMNS).where(self._scope(), _E.c.key == key, _live(now))

        def fn(conn: Connection) -> MemoryEntry | None:
            row = conn.execute(stmt).first()
            return None if row is None else _entry(row)

        entry = await self.memory.store.run(fn)
        if entry is not None:
            self._read(entry, None)
        return entry

    async def list(
        self, prefix: str = "", *, subject: str | None = None, limit: int = 100
    ) -> builtins.list[MemoryEntry]:
        """Live entries in key order, optionally only those under ``prefix`` or about ``subject``."""
        if limit < 1:
            raise InvalidInputError("limit must be at least 1")
        stmt = sa.select(*_COLUMNS).where(self._scope(), _live(self.memory.clock()))
        if prefix:
            stmt = stmt.where(_E.c.key.startswith(prefix, autoescape=True))
        if subject is not None:
            stmt = stmt.where(self._about(subject))
        stmt = stmt.order_by(_E.c.key).limit(limit)
        entries: builtins.list[MemoryEntry] = await self.memory.store.run(
            lambda conn: [_entry(row) for row in conn.execute(stmt)]
        )
        for entry in entries:
            self._read(entry, None)
        return entries

    async def search(
        self,
        query: str,
        k: int = 5,
        filter: Mapping[str, Any] | None = None,
        *,
        prefix: str | None = None,
        subject: str | None = None,
        min_score: float | None = None,
    ) -> builtins.list[MemoryHit]:
        """The ``k`` live entries whose text is most similar to ``query``, best first.

        ``filter`` keeps entries whose value (a JSON object) has those exact top-level fields,
        e.g. ``{"label": "billing"}``. Scores are cosine similarities in [-1, 1]; ties go by key.
        """
        if not 1 <= k <= MAX_K:
            raise InvalidInputError(f"k must be between 1 and {MAX_K}, got {k}")
        keep = (lambda value: _matches(value, filter)) if filter else None
        hits = await self._rank(query, k, keep, prefix=prefix, subject=subject, min_score=min_score)
        for hit in hits:
            self._read(hit.entry, f"search hit, score {hit.score:.2f}")
        return hits

    async def classify(
        self,
        text: str,
        k: int = 5,
        *,
        label_field: str = "label",
        filter: Mapping[str, Any] | None = None,
        min_score: float | None = None,
    ) -> Prediction:
        """Classify ``text`` by a similarity-weighted vote of the ``k`` nearest labelled entries
        (JSON objects with a ``label_field``), e.g. past cases as a human settled them."""
        if not 1 <= k <= MAX_K:
            raise InvalidInputError(f"k must be between 1 and {MAX_K}, got {k}")

        def keep(value: Any) -> bool:
            labelled = isinstance(value, Mapping) and value.get(label_field) is not None
            return labelled and (not filter or _matches(value, filter))

        hits = await self._rank(text, k, keep, min_score=min_score)
        for hit in hits:
            self._read(hit.entry, f"nearest example, score {hit.score:.2f}")
        return vote([(str(h.entry.value[label_field]), h.score, h.entry.key) for h in hits])

    async def _rank(
        self,
        query: str,
        k: int,
        keep: Callable[[Any], bool] | None,
        *,
        prefix: str | None = None,
        subject: str | None = None,
        min_score: float | None = None,
    ) -> builtins.list[MemoryHit]:
        """Exact top-k by cosine over the scope's live, embedded entries (brute force)."""
        if not isinstance(query, str) or not query.strip():
            raise InvalidInputError("search query must be a non-empty string")
        stmt = sa.select(*_COLUMNS, _E.c.embedder, _E.c.vector).where(
            self._scope(), _live(self.memory.clock()), _E.c.text.is_not(None)
        )
        if prefix:
            stmt = stmt.where(_E.c.key.startswith(prefix, autoescape=True))
        if subject is not None:
            stmt = stmt.where(self._about(subject))
        rows = await self.memory.store.run(lambda conn: builtins.list(conn.execute(stmt)))
        if keep is not None:
            rows = [row for row in rows if keep(json.loads(row.value))]
        if not rows:
            return []
        embedder = self.memory.get_embedder()
        # entries embedded by another model (or not at all) are embedded again from their text
        stale = [i for i, row in enumerate(rows) if row.embedder != embedder.name or row.vector is None]
        fresh = await self.memory.embed([query] + [rows[i].text for i in stale])
        again = dict(zip(stale, fresh[1:], strict=True))

        def score_all() -> builtins.list[tuple[float, str, int]]:
            # CPU-bound: runs in a thread so the event loop keeps serving other runs meanwhile
            q = fresh[0]
            scored = []
            for i, row in enumerate(rows):
                score = dot(q, again[i] if i in again else unpack(row.vector))
                if min_score is None or score >= min_score:
                    scored.append((score, row.key, i))
            return heapq.nsmallest(k, scored, key=lambda item: (-item[0], item[1]))

        best = await asyncio.to_thread(score_all)
        return [MemoryHit(_entry(rows[i]), score) for score, _, i in best]

    # -- helpers -------------------------------------------------------------------------

    def _scope(self) -> sa.ColumnElement[bool]:
        return sa.and_(
            _E.c.tenant == self.tenant, _E.c.workflow == self.workflow, _E.c.namespace == self.namespace
        )

    def _about(self, subject: str) -> sa.ColumnElement[bool]:
        tagged = sa.select(_S.c.key).where(
            _S.c.tenant == self.tenant,
            _S.c.workflow == self.workflow,
            _S.c.namespace == self.namespace,
            _S.c.subject == subject,
        )
        return _E.c.key.in_(tagged)

    def _read(self, entry: MemoryEntry, note: str | None) -> None:
        if self._on_read is not None:
            self._on_read("memory", entry.ref, entry.digest, note)


_COLUMNS = (
    _E.c.tenant,
    _E.c.workflow,
    _E.c.namespace,
    _E.c.key,
    _E.c.value,
    _E.c.digest,
    _E.c.created_at,
    _E.c.updated_at,
    _E.c.expires_at,
    _E.c.text,
    _E.c.subjects,
)


def _entry(row: Any) -> MemoryEntry:
    m = row._mapping
    return MemoryEntry(
        tenant=m["tenant"],
        workflow=m["workflow"],
        namespace=m["namespace"],
        key=m["key"],
        value=json.loads(m["value"]),
        digest=m["digest"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        expires_at=m["expires_at"],
        text=m["text"],
        subjects=tuple(json.loads(m["subjects"])) if m["subjects"] else (),
    )


def _live(now: float) -> sa.ColumnElement[bool]:
    return sa.or_(_E.c.expires_at.is_(None), _E.c.expires_at > now)


def _entry_cond(tenant: str, workflow: str, namespace: str, key: str) -> sa.ColumnElement[bool]:
    return sa.and_(
        _E.c.tenant == tenant, _E.c.workflow == workflow, _E.c.namespace == namespace, _E.c.key == key
    )


def _same_entry() -> sa.ColumnElement[bool]:
    """Joins a subject row to its entry (inside a correlated EXISTS)."""
    return sa.and_(
        _E.c.tenant == _S.c.tenant,
        _E.c.workflow == _S.c.workflow,
        _E.c.namespace == _S.c.namespace,
        _E.c.key == _S.c.key,
    )


def _delete_subject_rows(conn: Connection, tenant: str, workflow: str, namespace: str, key: str) -> None:
    conn.execute(
        _S.delete().where(
            _S.c.tenant == tenant, _S.c.workflow == workflow, _S.c.namespace == namespace, _S.c.key == key
        )
    )
