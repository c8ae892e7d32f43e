"""Long-term memory on SQLite and PostgreSQL: values, retention, deletion, erasure, search, isolation."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from controltower.gateway.audit import AuditLog
from controltower.memory import HashedEmbedder, Memory
from controltower.spec.errors import InvalidInputError
from controltower.store import SqlStore, open_store

from .examples import TEST, TRAIN


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def memory(store: SqlStore, clock: Clock) -> Memory:
    return Memory(store, embedder=HashedEmbedder(), audit=AuditLog(store), clock=clock)


async def test_values_round_trip_and_replace(memory: Memory, clock: Clock) -> None:
    view = memory.view("acme", "support")
    value = {"name": "Ana", "tier": "pro", "tags": ["vip"], "n": 3, "ok": True, "none": None}
    entry = await view.put("customer:1", value)
    assert await view.get("customer:1") == value
    assert (
        entry.digest
        == hashlib.sha256(
            b'{"n": 3, "name": "Ana", "none": null, "ok": true, "tags": ["vip"], "tier": "pro"}'
        ).hexdigest()
    )
    clock.now += 10
    replaced = await view.put("customer:1", "now a string")
    assert (replaced.created_at, replaced.updated_at) == (entry.created_at, entry.created_at + 10)
    assert await view.get("customer:1") == "now a string"
    assert await view.get("missing", default=42) == 42
    assert [e.key for e in await view.list()] == ["customer:1"]


async def test_ttl_hides_then_purge_removes(memory: Memory, clock: Clock, store: SqlStore) -> None:
    view = memory.view("acme", "support")
    await view.put("short", {"text": "reset the password"}, ttl=60, subjects=["customer:9"])
    await view.put("forever", {"v": 2})
    assert await view.get("short") == {"text": "reset the password"}
    assert [h.entry.key for h in await view.search("password", k=5)] == ["short"]
    clock.now += 61
    # invisible at once, before any purge
    assert await view.get("short") is None
    assert [e.key for e in await view.list()] == ["forever"]
    assert await view.search("password", k=5) == []
    assert await memory.purge_expired() == 1
    assert await memory.purge_expired() == 0
    # the purge took the subject tag with it
    assert await _count(store, "memory_subjects") == 0
    # a new put under an expired key starts a new life
    await view.put("short", {"v": 3}, ttl=60)
    assert (await view.get_entry("short")).created_at == clock.now  # type: ignore[union-attr]


async def test_delete_by_key_and_by_prefix(memory: Memory) -> None:
    view = memory.view("acme", "support")
    for key in ["case:1", "case:2", "case_3", "case%4", "other"]:
        await view.put(key, key)
    assert await view.delete("case:1") is True
    assert await view.delete("case:1") is False
    # LIKE wildcards in a prefix are literal characters
    assert await view.delete_prefix("case%") == 1
    assert await view.delete_prefix("case:") == 1
    assert [e.key for e in await view.list()] == ["case_3", "other"]
    assert await view.delete_prefix("") == 2
    assert await view.list() == []


async def test_forget_subject_erases_across_workflows_and_is_audited(memory: Memory) -> None:
    support = memory.view("acme", "support")
    leads = memory.view("acme", "leads", "people")
    await support.put("ticket:1", {"text": "Ana was charged twice"}, subjects=["customer:ana", "ticket:1"])
    await support.put("ticket:2", {"text": "Bo asks about VAT"}, subjects=["customer:bo"])
    await leads.put("lead:ana", {"email": "ana@example.com"}, subjects=["customer:ana"])
    other_tenant = memory.view("globex", "support")
    await other_tenant.put("ticket:1", {"text": "same subject id, other tenant"}, subjects=["customer:ana"])

    assert [e.key for e in await support.list(subject="customer:ana")] == ["ticket:1"]
    assert await memory.forget_subject("acme", "customer:ana", by="user:dpo") == 2
    assert await support.get("ticket:1") is None
    assert await leads.get("lead:ana") is None
    assert await support.get("ticket:2") == {"text": "Bo asks about VAT"}
    assert [h.entry.key for h in await support.search("charged twice", k=3)] == ["ticket:2"]
    # the other tenant's entry about the same id is untouched
    assert await other_tenant.get("ticket:1") is not None
    # the erasure's other tags went with it; a second erasure finds nothing
    assert await support.list(subject="ticket:1") == []
    assert await memory.forget_subject("acme", "customer:ana") == 0

    records = await memory.audit.query("acme", kind="memory_erasure")
    assert [(r.actor, r.outcome, r.data["entries"]) for r in records] == [
        ("user:dpo", "erased", 2),
        ("system", "erased", 0),
    ]
    # the audit trail proves the erasure without keeping who it was about
    assert all("customer:ana" not in r.model_dump_json() for r in records)
    assert records[0].inputs_digest == hashlib.sha256(b"customer:ana").hexdigest()


async def test_search_ranks_by_similarity_with_filters(memory: Memory) -> None:
    view = memory.view("acme", "support", "examples")
    for i, (text, label) in enumerate(TRAIN):
        await view.put(f"ex:{i:02d}", {"text": text, "label": label})
    await view.put("note", {"no": "text field"})  # not embedded: found by key only

    hits = await view.search("I was billed twice for my subscription, please refund", k=3)
    assert hits[0].entry.value["text"] == "I was charged twice for my subscription this month"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert all(-1.0 <= h.score <= 1.0 for h in hits)

    only_howto = await view.search("charged twice refund", k=4, filter={"label": "howto"})
    assert len(only_howto) == 4
    assert {h.entry.value["label"] for h in only_howto} == {"howto"}
    assert await view.search("charged twice", k=2, prefix="nope") == []
    assert all(h.score >= 0.3 for h in await view.search("phishing email", k=10, min_score=0.3))

    correct = 0
    for text, label in TEST:
        prediction = await view.classify(text, k=3)
        correct += prediction.label == label
    assert correct >= len(TEST) - 1


async def test_entries_embedded_by_another_model_are_re_embedded(store: SqlStore) -> None:
    old = Memory(store, embedder=HashedEmbedder(dim=256)).view("acme", "support")
    await old.put("a", "reset my password please")
    await old.put("b", "invoice has the wrong VAT number")
    new = Memory(store, embedder=HashedEmbedder(dim=512)).view("acme", "support")
    hits = await new.search("password reset", k=1)
    assert hits[0].entry.key == "a"
    assert hits[0].score > 0.3


async def test_tenants_and_workflows_are_isolated(memory: Memory) -> None:
    a = memory.view("tenant-a", "support")
    b = memory.view("tenant-b", "support")
    a_other_wf = memory.view("tenant-a", "leads")
    await a.put("secret", {"text": "tenant A's customer was charged twice"}, subjects=["customer:1"])
    assert await b.get("secret") is None
    assert await b.list() == []
    assert await b.search("charged twice", k=5) == []
    assert await a_other_wf.search("charged twice", k=5) == []
    assert await b.delete("secret") is False
    assert await b.delete_prefix("") == 0
    assert await b.forget_subject("customer:1") == 0
    assert await a.get("secret") == {"text": "tenant A's customer was charged twice"}
    assert [s[0] for s in await memory.scopes("tenant-b")] == []
    assert await memory.scopes("tenant-a") == [("support", "default", 1)]


BAD_INPUT: list[tuple[Any, str]] = [
    (lambda v: v.put("", 1), "key must be a non-empty string"),
    (lambda v: v.put("k" * 301, 1), "longer than 300"),
    (lambda v: v.put("k", object()), "not JSON"),
    (lambda v: v.put("k", "x" * 300_000), "the limit is"),
    (lambda v: v.put("k", 1, ttl=0), "ttl must be a positive"),
    (lambda v: v.put("k", 1, subjects=[""]), "subject must be a non-empty string"),
    (lambda v: v.search("   "), "non-empty string"),
    (lambda v: v.search("x", k=0), "k must be between"),
    (lambda v: v.list(limit=0), "limit must be at least 1"),
    (lambda v: v.classify("x", k=0), "k must be between"),
]


async def test_bad_input_is_a_clear_error(sqlite_url: str) -> None:
    store = await open_store(sqlite_url)
    try:
        view = Memory(store).view("acme", "support")
        for call, message in BAD_INPUT:
            with pytest.raises(InvalidInputError, match=message):
                await call(view)
        assert await view.list() == []
    finally:
        await store.close()


async def test_bad_scope_names_are_refused(sqlite_url: str) -> None:
    store = await open_store(sqlite_url, migrate=False)
    memory = Memory(store)
    with pytest.raises(InvalidInputError, match="tenant must be a non-empty string"):
        memory.view("", "support")
    with pytest.raises(InvalidInputError, match="workflow is longer"):
        memory.view("acme", "w" * 101)
    await store.close()


async def _count(store: SqlStore, table: str) -> int:
    import sqlalchemy as sa

    from controltower.store import tables as t

    tbl = getattr(t, table)
    return int(
        await store.run(lambda conn: conn.execute(sa.select(sa.func.count()).select_from(tbl)).scalar())
    )
