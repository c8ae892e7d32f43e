"""The audit chain: appends chain correctly under concurrency, and every kind of tampering is caught.

Tampering is done the way an attacker with database access would do it: plain SQL on the
``audit`` table. Runs on SQLite and PostgreSQL through the parametrised ``store`` fixture.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from controltower.gateway.audit import (
    GENESIS,
    AuditEvent,
    AuditLog,
    AuditRecord,
    compute_hash,
    verify_jsonl,
)
from controltower.gateway.secrets import Redactor
from controltower.spec.errors import InvalidInputError
from controltower.store import SqlStore, open_store
from controltower.store import tables as t

COLUMNS = [c.name for c in t.audit.columns if c.name != "seq"]


def event(i: int = 0, **fields: Any) -> AuditEvent:
    values: dict[str, Any] = {
        "tenant": "acme",
        "actor": "agent-1",
        "kind": "tool_call",
        "subject": "crm.update",
        "outcome": "executed",
        "ts": 1_700_000_000.0 + i,
        "data": {"i": i, "side_effect": "write"},
    }
    values.update(fields)
    return AuditEvent(**values)


async def fill(log: AuditLog, n: int) -> list[AuditRecord]:
    return [await log.append(event(i)) for i in range(n)]


async def sql(store: SqlStore, statement: str, **params: Any) -> None:
    await store.run(lambda conn: conn.execute(sa.text(statement), params))


async def rows(store: SqlStore) -> list[dict[str, Any]]:
    result = await store.run(lambda conn: conn.execute(sa.select(t.audit).order_by(t.audit.c.seq)).all())
    return [dict(row._mapping) for row in result]


async def swap(store: SqlStore, a: int, b: int) -> None:
    """Exchange everything but ``seq`` between two records."""

    def job(conn: sa.Connection) -> None:
        first, second = (
            dict(conn.execute(sa.select(t.audit).where(t.audit.c.seq == s)).one()._mapping) for s in (a, b)
        )
        for seq, source in ((a, second), (b, first)):
            values = {name: source[name] for name in COLUMNS}
            conn.execute(t.audit.update().where(t.audit.c.seq == seq).values(**values))

    await store.run(job)


# -- the chain -------------------------------------------------------------------------------


async def test_chain_of_records_verifies(store: SqlStore) -> None:
    log = AuditLog(store)
    records = await fill(log, 30)
    assert [r.seq for r in records] == list(range(1, 31))
    assert records[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(records))
    stored = await rows(store)
    assert [r["hash"] for r in stored] == [r.hash for r in records]
    result = await log.verify()
    assert result.ok, result.message
    assert (result.checked, result.scanned, result.head_seq, result.head_hash) == (
        30,
        30,
        30,
        records[-1].hash,
    )
    assert result.problem is None
    assert result.first_bad_seq is None


async def test_empty_chain_verifies(store: SqlStore) -> None:
    result = await AuditLog(store).verify()
    assert result.ok
    assert result.scanned == 0
    assert result.head_hash == GENESIS


async def test_hash_is_reproducible_from_the_stored_row(store: SqlStore) -> None:
    log = AuditLog(store)
    await fill(log, 3)
    for row in await rows(store):
        fields = {**row, "data": json.loads(row["data"])}
        assert compute_hash(fields) == row["hash"]


async def test_append_many_is_contiguous_and_in_order(store: SqlStore) -> None:
    log = AuditLog(store)
    records = await log.append_many([event(i) for i in range(5)])
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert [r.data["i"] for r in records] == [0, 1, 2, 3, 4]
    assert await log.append_many([]) == []


async def test_data_and_reason_are_redacted_before_hashing(store: SqlStore) -> None:
    redactor = Redactor(["sk-live-123456"])
    log = AuditLog(store, redactor=redactor)
    record = await log.append(
        event(
            reason="call with sk-live-123456 failed",
            data={"echo": "key=sk-live-123456", "password": "hunter22"},
        )
    )
    stored = (await rows(store))[0]
    assert "sk-live-123456" not in stored["data"]
    assert "hunter22" not in stored["data"]
    assert "sk-live-123456" not in stored["reason"]
    assert record.data == {"echo": "key=[REDACTED]", "password": "[REDACTED]"}
    assert (await log.verify()).ok


async def test_non_json_data_is_normalised_and_nan_refused(store: SqlStore) -> None:
    import datetime as dt

    log = AuditLog(store)
    record = await log.append(event(data={"when": dt.date(2024, 1, 2), "pair": (1, 2)}))
    assert record.data == {"when": "2024-01-02", "pair": [1, 2]}
    with pytest.raises(InvalidInputError, match="NaN"):
        await log.append(event(data={"x": float("nan")}))
    assert (await log.verify()).ok


# -- tampering -------------------------------------------------------------------------------


async def test_edited_field_is_detected_at_its_seq(store: SqlStore) -> None:
    log = AuditLog(store)
    await fill(log, 20)
    await sql(store, "UPDATE audit SET outcome = 'denied' WHERE seq = 13")
    result = await log.verify()
    assert not result.ok
    assert (result.problem, result.first_bad_seq) == ("edited", 13)
    assert result.checked == 12
    assert result.head_seq == 12


async def test_edited_data_and_timestamp_are_detected(store: SqlStore) -> None:
    log = AuditLog(store)
    await fill(log, 10)
    await sql(store, "UPDATE audit SET data = :d WHERE seq = 5", d='{"i": 4, "side_effect": "read"}')
    result = await log.verify()
    assert (result.problem, result.first_bad_seq) == ("edited", 5)
    await sql(store, "UPDATE audit SET data = :d WHERE seq = 5", d='{"i":4,"side_effect":"write"}')
    assert (await log.verify()).ok  # the same content, whatever the spacing
    await sql(store, "UPDATE audit SET ts = ts + 0.001 WHERE seq = 7")
    result = await log.verify()
    assert (result.problem, result.first_bad_seq) == ("edited", 7)


async def test_unparseable_data_counts_as_edited(store: SqlStore) -> None:
    log = AuditLog(store)
    await fill(log, 5)
    await sql(store, "UPDATE audit SET data = 'not json' WHERE seq = 2")
    result = await log.verify()
    assert (result.problem, result.first_bad_seq) == ("edited", 2)


async def test_edit_with_recomputed_hash_is_caught_by_the_next_link(store: SqlStore) -> None:
    log = AuditLog(store)
    await fill(log, 10)
    row = (await rows(store))[5]  # seq 6
    forged = {**row, "data": {"i": 5, "side_effect": "read"}}
    await sql(
        store,
        "UPDATE audit SET data = :data, hash = :hash WHERE seq = 6",
        data=json.dumps(forged["data"]),
        hash=compute_hash(forged),
    )
    result = await log.verify()
    assert (result.problem, result.first_bad_seq) == ("edited", 6)
    assert "recomputed" in result.message


async def test_deleted_middle_record_is_detected(store: SqlStore) -> None:
    log = AuditLog(store)
    await fill(log, 20)
    await sql(store, "DELETE FROM audit WHERE seq IN (8, 9)")
    result = await log.verify()
    assert (result.problem, result.first_bad_seq) == ("deleted", 8)
    assert "8..9" in result.message


async def test_swapped_records_are_reported_as_reordered(store: SqlStore) -> None:
    log = AuditLog(store)
    await fill(log, 20)
    await swap(store, 4, 11)
    result = await log.verify()
    assert (result.problem, result.first_bad_seq) == ("reordered", 4)
    assert "11" in result.message


async def test_adjacent_swap_is_reported_as_reordered(store: SqlStore) -> None:
    log = AuditLog(store)
    await fill(log, 10)
    await swap(store, 6, 7)
    result = await log.verify()
    assert (result.problem, result.first_bad_seq) == ("reordered", 6)


async def test_inserted_record_with_renumbering_is_detected(store: SqlStore) -> None:
    log = AuditLog(store)
    records = await fill(log, 10)
    # make room at seq 5 (two steps: a unique key may not allow seq = seq + 1 in place)
    await sql(store, "UPDATE audit SET seq = -seq WHERE seq >= 5")
    await sql(store, "UPDATE audit SET seq = 1 - seq WHERE seq < 0")
    forged = {**event(99).model_dump(), "seq": 5, "prev_hash": records[3].hash}
    forged["hash"] = compute_hash(forged)  # a well-formed record, linked to its predecessor
    await store.run(
        lambda conn: conn.execute(t.audit.insert().values(**{**forged, "data": json.dumps(forged["data"])}))
    )
    result = await log.verify()
    assert (result.problem, result.first_bad_seq) == ("inserted", 5)


async def test_removing_the_newest_records_needs_an_anchor(store: SqlStore) -> None:
    log = AuditLog(store)
    await fill(log, 10)
    anchor = await log.verify()
    await sql(store, "DELETE FROM audit WHERE seq > 8")
    assert (await log.verify()).ok  # what is left is a valid chain ...
    result = await log.verify(expect_head=(anchor.head_seq, anchor.head_hash))
    assert (result.problem, result.first_bad_seq) == ("deleted", 9)  # ... but not the one we saw


async def test_rewritten_chain_is_caught_by_the_anchor(store: SqlStore) -> None:
    log = AuditLog(store)
    await fill(log, 5)
    anchor = await log.verify()
    await sql(store, "UPDATE audit SET outcome = 'denied' WHERE seq = 2")
    prev = GENESIS
    for row in await rows(store):  # recompute every hash from there on, as a thorough forger would
        fixed = {**row, "data": json.loads(row["data"]), "prev_hash": prev}
        prev = compute_hash(fixed)
        stmt = "UPDATE audit SET prev_hash = :p, hash = :h WHERE seq = :s"
        await sql(store, stmt, p=fixed["prev_hash"], h=prev, s=row["seq"])
    assert (await log.verify()).ok  # undetectable without an anchor
    result = await log.verify(expect_head=(anchor.head_seq, anchor.head_hash))
    assert (result.problem, result.first_bad_seq) == ("edited", 5)


async def test_verify_streams_in_chunks_and_finds_a_break_in_a_later_chunk(store: SqlStore) -> None:
    log = AuditLog(store)
    await log.append_many([event(i) for i in range(120)])
    assert (await log.verify(chunk=7)).ok
    await sql(store, "UPDATE audit SET actor = 'someone-else' WHERE seq = 100")
    result = await log.verify(chunk=7)
    assert (result.problem, result.first_bad_seq, result.scanned) == ("edited", 100, 99)


async def test_tenant_verification_counts_its_records_but_fails_on_any_break(store: SqlStore) -> None:
    log = AuditLog(store)
    for i in range(10):
        await log.append(event(i, tenant="acme" if i % 2 else "globex"))
    result = await log.verify("acme")
    assert result.ok
    assert (result.checked, result.scanned) == (5, 10)
    await sql(store, "DELETE FROM audit WHERE seq = 3")  # a globex record
    result = await log.verify("acme")
    assert not result.ok
    assert (result.problem, result.first_bad_seq) == ("deleted", 3)


# -- concurrency -----------------------------------------------------------------------------


async def test_concurrent_appends_form_one_contiguous_chain(store: SqlStore) -> None:
    log = AuditLog(store)
    before = store.commits
    records = await asyncio.gather(*(log.append(event(i)) for i in range(200)))
    assert sorted(r.seq for r in records) == list(range(1, 201))
    assert len({r.hash for r in records}) == 200
    assert store.commits - before <= 20, "appends were not batched"
    result = await log.verify()
    assert result.ok
    assert result.scanned == 200


async def test_concurrent_appends_interleaved_with_other_store_jobs(store: SqlStore) -> None:
    """Audit jobs sharing a transaction with unrelated jobs (and with append_in) still chain."""
    log = AuditLog(store)

    async def inline(i: int) -> list[AuditRecord]:
        return await store.run(lambda conn: log.append_in(conn, [event(1000 + i)]))

    jobs = [log.append(event(i)) for i in range(50)] + [inline(i) for i in range(50)]
    await asyncio.gather(*jobs, *(store.list_workflows() for _ in range(20)))
    result = await log.verify()
    assert result.ok
    assert result.scanned == 100


async def test_a_bad_append_fails_alone(store: SqlStore) -> None:
    log = AuditLog(store)
    # a seq collision is impossible through the log; a value the database refuses is not
    too_long = event(0).model_copy(update={"tenant": "x" * 100})  # bypasses validation
    results = await asyncio.gather(
        *(log.append(event(i)) for i in range(5)), log.append(too_long), return_exceptions=True
    )
    if store.dialect == "postgresql":
        assert isinstance(results[-1], sa.exc.DBAPIError)
        assert sum(isinstance(r, AuditRecord) for r in results) == 5
    assert (await log.verify()).ok


async def test_listeners_see_committed_records_and_failures_are_contained(store: SqlStore) -> None:
    log = AuditLog(store)
    seen: list[int] = []

    async def good(record: AuditRecord) -> None:
        seen.append(record.seq)

    def bad(record: AuditRecord) -> None:
        raise RuntimeError("listener bug")

    log.add_listener(bad)
    log.add_listener(good)
    await fill(log, 3)
    assert seen == [1, 2, 3]


WORKER = """
import asyncio, sys
from controltower.store import open_store
from controltower.gateway.audit import AuditEvent, AuditLog

async def main(url, name, n):
    store = await open_store(url)
    log = AuditLog(store)
    print("ready", flush=True)
    sys.stdin.readline()
    for start in range(0, n, 10):
        events = [
            AuditEvent(tenant=name, actor=name, kind="tool_call", outcome="executed", data={"i": i})
            for i in range(start, min(n, start + 10))
        ]
        await asyncio.gather(*(log.append(e) for e in events))
        await asyncio.sleep(0.005)  # let the other process in, even on a loaded machine
    await store.close()
    print("done", flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_processes_sharing_one_store_keep_one_chain(store: SqlStore, store_url: str) -> None:
    """Two processes append at once (the ``store`` fixture has migrated the schema first)."""
    n = 300
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WORKER,
            store_url,
            f"p{i}",
            str(n),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for i in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"ready"
        for proc in procs:  # release both at once
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        for proc in procs:
            assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    reader = await open_store(store_url)
    try:
        result = await AuditLog(reader).verify()
        assert result.ok, result.message
        assert result.scanned == 2 * n
        stored = await rows(reader)
        assert [r["seq"] for r in stored] == list(range(1, 2 * n + 1))
        for name in ("p0", "p1"):
            assert sorted(json.loads(r["data"])["i"] for r in stored if r["tenant"] == name) == list(range(n))
        switches = sum(1 for a, b in itertools.pairwise(stored) if a["tenant"] != b["tenant"])
        assert switches > 1, "the two processes never interleaved: the test proved nothing"
    finally:
        await reader.close()


# -- query and export ------------------------------------------------------------------------


async def test_query_filters_and_tenant_scoping(store: SqlStore) -> None:
    log = AuditLog(store)
    await log.append(event(0, run_id="run-a", kind="tool_call"))
    await log.append(event(1, run_id="run-b", kind="approval", outcome="requested"))
    await log.append(event(2, run_id="run-a", kind="tool_call", actor="agent-2"))
    await log.append(event(3, tenant="globex", run_id="run-a"))
    await log.append(event(4, run_id="run-a", workflow="refunds"))

    assert [r.seq for r in await log.query("acme")] == [1, 2, 3, 5]
    assert [r.seq for r in await log.query("globex")] == [4]
    assert [r.seq for r in await log.query("acme", run_id="run-a")] == [1, 3, 5]
    assert [r.seq for r in await log.query("acme", kind="approval")] == [2]
    assert [r.seq for r in await log.query("acme", actor="agent-2")] == [3]
    assert [r.seq for r in await log.query("acme", workflow="refunds")] == [5]
    assert [r.seq for r in await log.query("acme", since=1_700_000_001.0, until=1_700_000_004.0)] == [2, 3]
    page1 = await log.query("acme", limit=2)
    page2 = await log.query("acme", limit=2, after_seq=page1[-1].seq)
    assert [r.seq for r in page1 + page2] == [1, 2, 3, 5]
    record = (await log.query("acme", run_id="run-b"))[0]
    assert record.data == {"i": 1, "side_effect": "write"}
    assert record.ts == 1_700_000_001.0
    with pytest.raises(InvalidInputError):
        await log.query("acme", limit=0)


async def test_export_round_trip_verifies_offline(store: SqlStore, tmp_path: Path) -> None:
    log = AuditLog(store)
    await log.append_many([event(i, data={"i": i, "text": "héllo ✓"}) for i in range(25)])
    path = tmp_path / "audit.jsonl"
    assert await log.export_jsonl(path, chunk=4) == 25
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 25
    first = json.loads(lines[0])
    assert {"seq", "prev_hash", "hash", "data", "ts"} <= set(first)
    assert first["seq"] == 1
    result = verify_jsonl(path)
    online = await log.verify()
    assert result.ok
    assert (result.scanned, result.head_hash) == (25, online.head_hash)

    stream = io.StringIO()
    assert await log.export_jsonl(stream, kind="tool_call") == 25
    assert stream.getvalue() == path.read_text(encoding="utf-8")


async def test_tampered_export_is_detected(store: SqlStore, tmp_path: Path) -> None:
    log = AuditLog(store)
    await fill(log, 12)
    path = tmp_path / "audit.jsonl"
    await log.export_jsonl(path)
    lines = path.read_text(encoding="utf-8").splitlines()

    def check(new_lines: list[str], **kwargs: Any) -> tuple[str | None, int | None]:
        target = tmp_path / "tampered.jsonl"
        target.write_text("\n".join(new_lines) + "\n", encoding="utf-8")
        result = verify_jsonl(target, **kwargs)
        assert not result.ok
        return result.problem, result.first_bad_seq

    edited = json.loads(lines[6])
    edited["outcome"] = "denied"
    assert check([*lines[:6], json.dumps(edited), *lines[7:]]) == ("edited", 7)
    assert check([*lines[:3], *lines[4:]]) == ("deleted", 4)
    assert check([*lines[:2], lines[5], lines[3], lines[4], lines[2], *lines[6:]]) == ("reordered", 3)
    third, sixth = json.loads(lines[2]), json.loads(lines[5])
    swapped = [json.dumps({**b, "seq": a["seq"]}) for a, b in ((third, sixth), (sixth, third))]
    assert check([*lines[:2], swapped[0], *lines[3:5], swapped[1], *lines[6:]]) == ("reordered", 3)
    assert check([*lines[:5], lines[4], *lines[5:]]) == ("inserted", 5)
    assert check([*lines[:5], "{not json", *lines[5:]]) == ("edited", 6)
    assert check(lines[:10], expect_head=(12, json.loads(lines[11])["hash"])) == ("deleted", 11)


async def test_filtered_export_verifies_record_by_record(store: SqlStore, tmp_path: Path) -> None:
    log = AuditLog(store)
    for i in range(10):
        await log.append(event(i, tenant="acme" if i < 3 or i > 6 else "globex"))
    path = tmp_path / "acme.jsonl"
    assert await log.export_jsonl(path, tenant="acme") == 6
    assert not verify_jsonl(path).ok  # not the whole chain
    result = verify_jsonl(path, contiguous=False)
    assert result.ok
    assert result.scanned == 6
    lines = path.read_text(encoding="utf-8").splitlines()
    edited = json.loads(lines[4])
    edited["actor"] = "nobody"
    path.write_text("\n".join([*lines[:4], json.dumps(edited), lines[5]]) + "\n", encoding="utf-8")
    result = verify_jsonl(path, contiguous=False)
    assert (result.problem, result.first_bad_seq) == ("edited", 9)


async def test_export_rejects_unknown_filters(store: SqlStore, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="colour"):
        await AuditLog(store).export_jsonl(tmp_path / "x.jsonl", colour="red")
    assert not (tmp_path / "x.jsonl").exists()
