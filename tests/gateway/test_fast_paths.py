"""The gateway's fast paths keep its guarantees: one transaction before the call, cached decisions
keyed on what the policies read, pre-serialised audit records, statements on the driver's cursor."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa

from controltower.gateway.audit import AuditEvent, AuditLog, compute_hash
from controltower.gateway.pipeline import ToolCallRequest, ToolGateway, open_gateway
from controltower.gateway.policy import PolicyEngine, PolicyRequest, _context_paths
from controltower.gateway.tools import ExecContext, ToolDefinition
from controltower.store import SqlStore
from controltower.store.sql import RawSql

POLICIES = {
    "p.cedar": """
@id("reads")
permit (principal in Workflow::"ops", action in Action::"read", resource);

@id("writes")
permit (principal in Workflow::"ops", action == Action::"ops.pay", resource);

@id("no-big-payments")
forbid (principal, action == Action::"ops.pay", resource)
when { context.args has amount && context.args.amount > 100 };
""",
}
RUNS: list[str] = []


async def pay(args: dict[str, Any], ctx: ExecContext) -> dict[str, Any]:
    RUNS.append(ctx.idempotency_key)
    await asyncio.sleep(0)
    return {"paid": args.get("amount", 0)}


async def peek(args: dict[str, Any], ctx: ExecContext) -> dict[str, Any]:
    return {"id": args["id"]}


SCHEMA = {"type": "object", "properties": {"id": {"type": "string"}, "amount": {"type": "integer"}}}
PAY = ToolDefinition(name="ops.pay", owner="ops", side_effect="write", input_schema=SCHEMA, cost_micros=500)
PEEK = ToolDefinition(name="ops.peek", owner="ops", input_schema=SCHEMA)
PRICED_PEEK = ToolDefinition(name="ops.priced_peek", owner="ops", input_schema=SCHEMA, cost_micros=7)


async def make_gateway(store: SqlStore) -> ToolGateway:
    gateway = await open_gateway(store, policy_texts=POLICIES)
    for tool, fn in ((PAY, pay), (PEEK, peek), (PRICED_PEEK, peek)):
        await gateway.registry.register(tool, fn)
    return gateway


def req(tool: str, args: dict[str, Any], step: str, run: str = "run-1") -> ToolCallRequest:
    return ToolCallRequest(
        tool=tool, args=args, workflow="ops", run_id=run, step_key=step, autonomy="expanded"
    )


async def test_transactions_per_call(store: SqlStore) -> None:
    """A write: one transaction before it runs (lookup, reservation, claim) and one after. On
    SQLite a lookup that needs no lock is read on the caller's thread: no store transaction."""
    gateway = await make_gateway(store)
    for tool in ("ops.peek", "ops.priced_peek", "ops.pay"):  # tools resolved, policy compiled
        assert (await gateway.call(req(tool, {"id": "w", "amount": 1}, f"warm-{tool}"))).ok
    sqlite = store.dialect == "sqlite"
    cases = [  # tool, args, transactions for the call, for its replay
        (
            "ops.pay",
            {"amount": 5},
            2,
            0 if sqlite else 1,
        ),  # lookup + reserve + claim | result + charge + audit
        # its price comes from the allotment granted in the warm-up: nothing to reserve before it
        ("ops.priced_peek", {"id": "a"}, 1 if sqlite else 2, 0 if sqlite else 1),  # (lookup) | result...
        ("ops.peek", {"id": "b"}, 1 if sqlite else 2, 0 if sqlite else 1),  # (lookup) | result + audit
    ]
    for n, (tool, args, commits, replay) in enumerate(cases):
        before = store.commits
        result = await gateway.call(req(tool, args, f"s{n}"))
        assert result.ok, result
        assert not result.replayed
        assert store.commits - before == commits, tool
        before = store.commits
        again = await gateway.call(req(tool, args, f"s{n}"))  # the recorded result
        assert again.ok
        assert again.replayed
        assert again.output == result.output
        assert store.commits - before == replay, tool
    await gateway.flush()  # gives the allotments back
    usage = await gateway.budgets.usage("default", "run:run-1", "micros")
    assert (usage.used, usage.reserved) == (1014, 0)  # charged once each (warm-up included)


async def test_replay_settles_an_interrupted_charge(store: SqlStore) -> None:
    """A recorded result whose charge was released meanwhile is charged on replay, once."""
    gateway = await make_gateway(store)
    assert (await gateway.call(req("ops.priced_peek", {"id": "a"}, "s"))).ok
    key = "default/run-1/s/0"

    def uncommit(conn: sa.Connection) -> None:  # as if the process died before the charge
        conn.execute(sa.text("UPDATE budgets SET used = used - 7 WHERE scope = 'run:run-1'"))
        conn.execute(sa.text("UPDATE budget_reservations SET status = 'released' WHERE key = :k"), {"k": key})

    await store.run(uncommit)
    for _ in range(2):
        again = await gateway.call(req("ops.priced_peek", {"id": "a"}, "s"))
        assert again.replayed
    await gateway.flush()
    usage = await gateway.budgets.usage("default", "run:run-1", "micros")
    assert (usage.used, usage.reserved) == (7, 0)


async def test_budget_exceeded_leaves_no_claim_and_no_charge(store: SqlStore) -> None:
    """The reservation fails inside the folded transaction: the call is not claimed, nothing is charged."""
    gateway = await make_gateway(store)
    await gateway.budgets.set_cap("default", "workflow:ops", "micros", 700)
    assert (await gateway.call(req("ops.pay", {"amount": 1}, "a"))).ok
    stopped = await gateway.call(req("ops.pay", {"amount": 2}, "b"))
    assert (stopped.status, stopped.code) == ("denied", "budget_exceeded")
    assert await gateway.calls.get("default/run-1/b/0") is None  # not claimed: a retry is not in doubt
    await gateway.budgets.set_cap("default", "workflow:ops", "micros", 10_000)
    retried = await gateway.call(req("ops.pay", {"amount": 2}, "b"))
    assert retried.ok
    assert not retried.replayed
    usage = await gateway.budgets.usage("default", "workflow:ops", "micros")
    assert (usage.used, usage.reserved) == (1000, 0)


async def test_concurrent_calls_of_one_write_key_run_it_once(store: SqlStore, store_url: str) -> None:
    """Two stores (as two processes would) race on one call key: the write runs at most once."""
    from controltower.store import open_store

    other_store = await open_store(store_url)
    try:
        first, second = await make_gateway(store), await make_gateway(other_store)
        RUNS.clear()
        request = req("ops.pay", {"amount": 3}, "race")
        results = await asyncio.gather(first.call(request), second.call(request))
        assert RUNS.count("default/run-1/race/0") == 1
        assert sorted(r.status for r in results) in (["denied", "ok"], ["ok", "ok"])
        for result in results:
            assert result.ok or result.code == "in_doubt"
        await first.flush()  # the allotments go back: only the call's price stays, once
        await second.flush()
        usage = await first.budgets.usage("default", "run:run-1", "micros")
        assert (usage.used, usage.reserved) == (500, 0)
    finally:
        await other_store.close()


async def test_denied_call_still_replays_its_recorded_result(store: SqlStore) -> None:
    """The decision is made before the lookup now, but a recorded result still wins over it."""
    gateway = await make_gateway(store)
    done = await gateway.call(req("ops.pay", {"amount": 9}, "s"))
    assert done.ok
    await gateway.controls.pause("default", "other", "unrelated", by="test")
    gateway.reload_policies(
        {"p.cedar": 'permit (principal in Workflow::"ops", action in Action::"read", resource);'}
    )
    again = await gateway.call(req("ops.pay", {"amount": 9}, "s"))
    assert again.replayed
    assert again.output == done.output
    denied = await gateway.call(req("ops.pay", {"amount": 9}, "new-step"))
    assert denied.code == "no_grant"


# -- cached decisions ---------------------------------------------------------------------------


def decide(engine: PolicyEngine, tool: ToolDefinition, args: dict[str, Any], **who: Any) -> str:
    fields: dict[str, Any] = {"agent": None, "workflow": "ops", "department": None, "tenant": "default"}
    fields.update(who)
    return engine.decide(PolicyRequest(tool=tool, env="dev", args=args, **fields)).effect


def test_cached_decisions_follow_the_arguments_the_policies_read() -> None:
    engine = PolicyEngine(POLICIES, [PAY, PEEK])
    for _ in range(2):  # the second round is served from the cache: same answers
        assert decide(engine, PAY, {"amount": 5}) == "allow"
        assert decide(engine, PAY, {"amount": 500}) == "deny"
        assert decide(engine, PAY, {}) == "allow"
        assert decide(engine, PAY, {"amount": 5}, workflow="elsewhere") == "deny"
        assert decide(engine, PAY, {"amount": "5"}) == "deny"  # wrong type: denied before the cache
    # what no policy reads does not split the cache: one entry per distinct `amount`
    before = len(engine._decisions)
    assert decide(engine, PEEK, {"id": "x"}) == "allow"
    assert decide(engine, PEEK, {"id": "y"}) == "allow"
    assert len(engine._decisions) == before + 1


def test_a_policy_reading_a_whole_record_keys_on_all_of_it() -> None:
    texts = {
        "p.cedar": """
permit (principal in Workflow::"ops", action == Action::"ops.pay", resource)
when { context has args && context.args has id && context.args.id == "x" };
"""
    }
    engine = PolicyEngine(texts, [PAY])
    assert engine._context_paths == (("args",),)
    assert decide(engine, PAY, {"id": "x"}) == "allow"
    assert decide(engine, PAY, {"id": "y"}) == "deny"
    assert decide(engine, PAY, {"id": "x", "amount": 1}) == "allow"
    assert decide(engine, PAY, {"id": "y", "amount": 1}) == "deny"


def test_bare_context_means_the_whole_context() -> None:
    body = {"==": {"left": {"Var": "context"}, "right": {"Record": {}}}}
    chained = {".": {"left": {".": {"left": {"Var": "context"}, "attr": "args"}}, "attr": "a"}}
    assert _context_paths({"conditions": [{"kind": "when", "body": body}]}) == {()}
    assert _context_paths([{"body": chained}, {"has": {"left": {"Var": "context"}, "attr": "env"}}]) == {
        ("args", "a"),
        ("env",),
    }


# -- the audit record prepared off the store thread ---------------------------------------------


async def test_prepared_hash_input_is_the_canonical_form(store: SqlStore) -> None:
    log = AuditLog(store)
    events = [
        AuditEvent(actor="agent:ünï", kind="tool_call", outcome="executed", subject="ops.pay", ts=1.5),
        AuditEvent(
            tenant="t2",
            actor="a",
            kind="k",
            outcome="o",
            run_id="r",
            workflow="w",
            reason='quote " and \\ and \u2028',
            inputs_digest="d" * 64,
            data={"z": [1, 2.5, None, {"b": True, "a": "é"}], "a": 10**20},
            ts=1_700_000_000.1234567,
        ),
    ]
    rows = log.prepare(events)
    records = await store.run(lambda conn: log.append_prepared_in(conn, rows))
    for record in records:
        fields = record.model_dump()
        assert record.hash == compute_hash(fields)
    assert (await log.verify()).ok


# -- statements on the driver's cursor ----------------------------------------------------------


async def test_raw_statements_raise_sqlalchemy_errors(store: SqlStore) -> None:
    insert = RawSql("INSERT INTO payloads (digest, data, size, created_at) VALUES (:d, 'x', 1, 0)")
    await store.run(lambda conn: insert(conn, {"d": "same"}).close())
    with pytest.raises(sa.exc.IntegrityError):
        await store.run(lambda conn: insert(conn, {"d": "same"}).close())
    count = RawSql("SELECT count(*) FROM payloads WHERE digest = :d")
    assert await store.run(lambda conn: count(conn, {"d": "same"}).fetchone()[0]) == 1


async def test_read_reservation_is_visible_to_another_store_before_the_tool_runs(
    store: SqlStore, store_url: str
) -> None:
    """A read's (or an idempotent tool's) first commit skips the disk wait but not visibility:
    another store (another process) sees the reservation while the tool runs. A write's claim
    stays durable, and the result's commit is durable for every call."""
    from controltower.store import open_store

    other = await open_store(store_url)
    seen: list[tuple[str, int]] = []

    async def look(args: dict[str, Any], ctx: ExecContext) -> dict[str, Any]:
        def fn(conn: sa.Connection) -> Any:
            return conn.execute(
                sa.text("SELECT status, amount FROM budget_reservations WHERE key = :k"),
                {"k": ctx.idempotency_key},
            ).one()

        row = await other.run(fn)
        seen.append((row.status, row.amount))
        return {"id": args.get("id", "")}

    try:
        gateway = await make_gateway(store)
        gateway.allotments.enabled = False  # each call's own reservation (allotments: test_allotments.py)
        idempotent = ToolDefinition(
            name="ops.set",
            owner="ops",
            side_effect="write",
            input_schema=SCHEMA,
            cost_micros=9,
            tags=("idempotent",),
        )
        await gateway.registry.register(
            ToolDefinition(name="ops.look", owner="ops", input_schema=SCHEMA, cost_micros=11), look
        )
        await gateway.registry.register(idempotent, look)
        gateway.reload_policies(
            {
                **POLICIES,
                "set.cedar": 'permit (principal in Workflow::"ops", action == Action::"ops.set", resource);',
            }
        )
        cases = [("ops.look", 1), ("ops.set", 1), ("ops.pay", 0)]  # tool, relaxed commits per call
        for tool, _ in cases:  # tools resolved, policies compiled
            assert (await gateway.call(req(tool, {"id": "w", "amount": 1}, f"warm-{tool}"))).ok
        seen.clear()
        for n, (tool, relaxed) in enumerate(cases):
            before, relaxed_before = store.commits, store.relaxed_commits
            result = await gateway.call(req(tool, {"id": "x", "amount": 1}, f"v{n}"))
            assert result.ok, result
            assert store.commits - before == 2, tool  # reservation (+ claim), then result + charge + audit
            assert store.relaxed_commits - relaxed_before == relaxed, tool
        assert seen == [("reserved", 11), ("reserved", 9)]
        usage = await gateway.budgets.usage("default", "run:run-1", "micros")
        assert (usage.used, usage.reserved) == (2 * 520, 0)
    finally:
        await other.close()


async def test_deferred_records_are_bounded(store: SqlStore) -> None:
    """Under the engine a read does not wait for its record, but a caller that outruns the store
    waits once ``max_deferred`` records are queued: the backlog never grows without end."""
    gateway = await make_gateway(store)
    gateway.defer_read_records, gateway.max_deferred = True, 4
    backlog: list[int] = []

    async def look(args: dict[str, Any], ctx: ExecContext) -> dict[str, Any]:
        backlog.append(len(gateway._deferred))
        return {"id": args["id"]}

    await gateway.registry.register(ToolDefinition(name="ops.look", owner="ops", input_schema=SCHEMA), look)
    for n in range(60):
        assert (await gateway.call(req("ops.look", {"id": str(n)}, f"s{n}"))).ok
    assert max(backlog) <= 5
    await gateway.flush()
    count = await store.run(
        lambda conn: conn.execute(
            sa.text("SELECT count(*) FROM tool_calls WHERE status = 'completed'")
        ).scalar()
    )
    assert count == 60
