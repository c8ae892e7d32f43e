"""`tower memory list|get|search|forget|purge` on a real SQLite file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from controltower.cli.main import cli
from controltower.gateway.audit import AuditLog
from controltower.memory import Memory
from controltower.store import open_store


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'tower.db'}"

    async def seed() -> None:
        store = await open_store(url)
        support = Memory(store).view("default", "support")
        await support.put(
            "case:1",
            {"text": "charged twice for the subscription", "label": "billing"},
            subjects=["customer:ana"],
        )
        await support.put("case:2", {"text": "password reset link expired", "label": "access"})
        await support.put("case:3", {"text": "temporary note"}, ttl=0.001)
        await (
            Memory(store)
            .view("default", "leads")
            .put("lead:ana", {"email": "ana@example.com"}, subjects=["customer:ana"])
        )
        await Memory(store).view("other", "support").put("case:1", "another tenant")
        await store.close()

    asyncio.run(seed())
    return url


def tower(db: str, *args: str, ok: bool = True) -> Result:
    result = CliRunner().invoke(cli, ["--db", db, "memory", *args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_list_get_and_search(db: str) -> None:
    scopes = json.loads(tower(db, "list", "--json").output)
    assert scopes == [
        {"workflow": "leads", "namespace": "default", "entries": 1},
        {"workflow": "support", "namespace": "default", "entries": 2},  # the expired note is not counted
    ]
    entries = json.loads(tower(db, "list", "-w", "support", "--json").output)
    assert [e["key"] for e in entries] == ["case:1", "case:2"]
    assert "case:1" in tower(db, "list", "-w", "support", "--subject", "customer:ana").output

    got = json.loads(tower(db, "get", "case:2", "-w", "support").output)
    assert got["value"] == {"text": "password reset link expired", "label": "access"}

    hits = json.loads(tower(db, "search", "reset my password", "-w", "support", "-k", "1", "--json").output)
    assert [h["key"] for h in hits] == ["case:2"]
    only = json.loads(
        tower(
            db, "search", "reset my password", "-w", "support", "--where", '{"label": "billing"}', "--json"
        ).output
    )
    assert [h["key"] for h in only] == ["case:1"]
    assert "embedder: hashed-ngrams-v1:512" in tower(db, "search", "charged", "-w", "support").output


def test_errors_are_one_clear_line(db: str) -> None:
    missing = tower(db, "get", "nope", "-w", "support", ok=False)
    assert missing.exit_code == 1
    assert "error[not_found] no entry 'nope' in support/default" in missing.output
    assert "Traceback" not in missing.output
    no_wf = tower(db, "search", "x", ok=False)
    assert "error[invalid_input] search needs --workflow" in no_wf.output
    bad_where = tower(db, "search", "x", "-w", "support", "--where", "{oops", ok=False)
    assert "--where is not JSON" in bad_where.output
    two = tower(db, "forget", "--key", "a", "--prefix", "b", ok=False)
    assert "exactly one of --subject, --key or --prefix" in two.output


def test_forget_and_purge(db: str) -> None:
    out = tower(db, "forget", "--subject", "customer:ana", "--by", "dpo").output
    assert "erased 2 entries about the subject" in out
    assert json.loads(tower(db, "list", "-w", "leads", "--json").output) == []
    assert [e["key"] for e in json.loads(tower(db, "list", "-w", "support", "--json").output)] == ["case:2"]
    # the other tenant keeps its own entry
    assert json.loads(tower(db, "get", "case:1", "-w", "support", "--tenant", "other").output)["value"] == (
        "another tenant"
    )
    assert "deleted case:2" in tower(db, "forget", "-w", "support", "--key", "case:2").output
    assert "purged 1 expired entry" in tower(db, "purge").output
    assert "deleted 0 entries" in tower(db, "forget", "-w", "support", "--prefix", "case:").output

    async def audit() -> list[tuple[str, str]]:
        store = await open_store(db)
        records = await AuditLog(store).query("default", kind="memory_erasure")
        await store.close()
        return [(r.actor, r.outcome) for r in records]

    assert asyncio.run(audit()) == [("user:dpo", "erased")]
