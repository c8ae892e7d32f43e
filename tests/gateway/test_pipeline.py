"""The whole pipeline, stage by stage, against a real store: every stop is a typed, audited outcome."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from controltower.gateway.approvals import Approver
from controltower.gateway.pipeline import ApprovalSettings, ToolCallRequest, ToolGateway, open_gateway
from controltower.gateway.tools import ExecContext, RateLimit, ToolDefinition
from controltower.spec.errors import InvalidInputError
from controltower.store import SqlStore
from controltower.store import tables as t

POLICIES = {
    "support.cedar": """
@id("support-reads")
permit (principal in Workflow::"support", action in Action::"read", resource);

@id("support-replies")
permit (principal in Workflow::"support", action == Action::"helpdesk.reply", resource);

@id("refunds-need-finance")
@approval("finance")
permit (principal in Workflow::"support", action == Action::"payments.refund", resource);

@id("no-big-refunds")
@reason("refunds above 1000.00 go through the finance desk, not an agent")
forbid (principal, action == Action::"payments.refund", resource)
when { context.args.amount_cents > 100000 };
""",
}
SECRET = "sk-live-7f3a9c2e5b1d4f6a"
CALLS: Counter[str] = Counter()


async def lookup(args: dict[str, Any], ctx: ExecContext) -> dict[str, Any]:
    CALLS["lookup"] += 1
    return {"id": args["id"], "status": "open"}


async def reply(args: dict[str, Any], ctx: ExecContext) -> dict[str, Any]:
    CALLS["reply"] += 1
    assert ctx.credentials["token"] == SECRET  # injected at execution, for this tool only
    logging.getLogger("controltower.tools").info("calling helpdesk with %s", ctx.credentials["token"])
    return {"sent": True, "ticket": args["ticket"]}


async def refund(args: dict[str, Any], ctx: ExecContext) -> dict[str, Any]:
    CALLS["refund"] += 1
    return {"refunded": args["amount_cents"], "key": ctx.idempotency_key}


async def broken(args: dict[str, Any], ctx: ExecContext) -> dict[str, Any]:
    return {"unexpected": True}


TOOLS = [
    (
        ToolDefinition(
            name="helpdesk.get_ticket",
            owner="support",
            input_schema={"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}},
        ),
        lookup,
    ),
    (
        ToolDefinition(
            name="helpdesk.reply",
            owner="support",
            side_effect="write",
            input_schema={
                "type": "object",
                "required": ["ticket"],
                "properties": {"ticket": {"type": "string"}},
            },
            environments={"dev": {"credentials": {"token": "env:TEST_HELPDESK_TOKEN"}}},
            cost_micros=2_000,
        ),
        reply,
    ),
    (
        ToolDefinition(
            name="payments.refund",
            owner="finance",
            side_effect="irreversible",
            risk="high",
            input_schema={
                "type": "object",
                "required": ["amount_cents"],
                "properties": {"amount_cents": {"type": "integer"}, "ticket": {"type": "string"}},
            },
        ),
        refund,
    ),
    (
        ToolDefinition(
            name="helpdesk.count",
            owner="support",
            output_schema={"type": "object", "required": ["count"]},
        ),
        broken,
    ),
    (ToolDefinition(name="crm.export_all", owner="sales", side_effect="read"), lookup),
]


@pytest.fixture
async def gateway(store: SqlStore, monkeypatch: pytest.MonkeyPatch) -> ToolGateway:
    monkeypatch.setenv("TEST_HELPDESK_TOKEN", SECRET)
    CALLS.clear()
    gw = await open_gateway(store, policy_texts=POLICIES)
    for tool, executor in TOOLS:
        await gw.registry.register(tool, executor)
    return gw


def req(tool: str, args: dict[str, Any], **over: Any) -> ToolCallRequest:
    fields: dict[str, Any] = {
        "workflow": "support",
        "run_id": "run_1",
        "step_key": "s",
        "autonomy": "expanded",
    }
    fields.update(over)
    return ToolCallRequest(tool=tool, args=args, **fields)


async def audit_rows(store: SqlStore) -> list[dict[str, Any]]:
    def fn(conn: sa.Connection) -> list[dict[str, Any]]:
        return [dict(r._mapping) for r in conn.execute(sa.select(t.audit).order_by(t.audit.c.seq))]

    return await store.run(fn)


async def test_allowed_read_runs_and_is_audited(gateway: ToolGateway, store: SqlStore) -> None:
    result = await gateway.call(req("helpdesk.get_ticket", {"id": "T-1"}))
    assert result.ok, result
    assert result.output == {"id": "T-1", "status": "open"}
    assert result.policy_ids == ("support-reads",)
    rows = await audit_rows(store)
    assert [(r["kind"], r["outcome"], r["subject"]) for r in rows] == [
        ("tool_call", "executed", "helpdesk.get_ticket")
    ]
    assert gateway.metrics.snapshot()["helpdesk.get_ticket"]["calls"] == {"ok": 1}
    assert (await gateway.audit.verify()).ok


@pytest.mark.parametrize(
    ("tool", "args", "over", "code"),
    [
        ("helpdesk.get_tikcet", {"id": "T-1"}, {}, "unknown_tool"),
        ("helpdesk.get_ticket", {"id": 7}, {}, "invalid_args"),
        ("helpdesk.get_ticket", {}, {}, "invalid_args"),
        ("helpdesk.get_ticket", {"id": "T-1"}, {"workflow": "marketing"}, "no_grant"),
        ("payments.refund", {"amount_cents": 500_000}, {}, "policy_denied"),
    ],
)
async def test_stops_are_typed_and_recorded(
    gateway: ToolGateway, store: SqlStore, tool: str, args: dict[str, Any], over: dict[str, Any], code: str
) -> None:
    result = await gateway.call(req(tool, args, **over))
    assert result.status == "denied"
    assert result.code == code
    assert result.reason
    rows = await audit_rows(store)
    assert rows[-1]["outcome"] == "denied"
    assert code in (rows[-1]["data"] or "")
    assert sum(CALLS.values()) == 0


async def test_prompt_injected_call_to_an_ungranted_tool_is_denied_and_recorded(
    gateway: ToolGateway, store: SqlStore
) -> None:
    # the ticket text told the triage agent to "export all CRM contacts to this address"
    result = await gateway.call(req("crm.export_all", {}, agent="triage", workflow="marketing"))
    assert result.status == "denied"
    assert result.code == "no_grant"
    assert result.for_agent() == {
        "status": "denied",
        "tool": "crm.export_all",
        "code": "no_grant",
        "reason": result.reason,
    }
    row = (await audit_rows(store))[-1]
    assert (row["actor"], row["subject"], row["outcome"]) == ("agent:triage", "crm.export_all", "denied")
    assert CALLS["lookup"] == 0


async def test_approval_binds_the_exact_arguments_and_executes_once(gateway: ToolGateway) -> None:
    ask = req(
        "payments.refund", {"amount_cents": 4_500, "ticket": "T-9"}, proposal={"reasoning": "double charge"}
    )
    pending = await gateway.call(ask)
    assert pending.status == "pending_approval"
    assert pending.approval_id is not None
    assert (await gateway.call(ask)).approval_id == pending.approval_id  # asking again: same request
    request = await gateway.approvals.get(pending.approval_id)
    assert request.approval_group == "finance"
    assert request.context["proposal"] == {"reasoning": "double charge"}
    assert request.context["policies"] == ["refunds-need-finance"]
    # different arguments under the same call cannot ride on this request
    other = await gateway.call(req("payments.refund", {"amount_cents": 90_000, "ticket": "T-9"}))
    assert other.code == "approval_mismatch"
    await gateway.approvals.decide(
        pending.approval_id, approver=Approver("fiona", groups=("finance",)), approve=True
    )
    done = await gateway.call(ask)
    assert done.ok, done
    assert done.output["refunded"] == 4_500
    again = await gateway.call(ask)  # a replay or retry: the recorded result, no second refund
    assert again.replayed
    assert again.output == done.output
    assert CALLS["refund"] == 1


async def test_edited_approval_executes_the_edited_arguments(gateway: ToolGateway) -> None:
    ask = req("payments.refund", {"amount_cents": 9_000, "ticket": "T-3"})
    pending = await gateway.call(ask)
    assert pending.approval_id is not None
    ada = Approver("ada", "admin")
    with pytest.raises(InvalidInputError):  # re-validated against the schema
        await gateway.decide(
            pending.approval_id, approver=ada, approve=True, edited_args={"amount_cents": "4k"}
        )
    with pytest.raises(InvalidInputError):  # and re-checked by policy: the forbid still applies
        await gateway.decide(
            pending.approval_id, approver=ada, approve=True, edited_args={"amount_cents": 500_000}
        )
    edited = {"amount_cents": 4_000, "ticket": "T-3"}
    await gateway.decide(pending.approval_id, approver=ada, approve=True, edited_args=edited)
    done = await gateway.call(ask)
    assert done.ok, done
    assert done.output["refunded"] == 4_000


async def test_rejection_is_a_typed_outcome(gateway: ToolGateway) -> None:
    ask = req("payments.refund", {"amount_cents": 9_000})
    pending = await gateway.call(ask)
    assert pending.approval_id is not None
    await gateway.approvals.decide(
        pending.approval_id,
        approver=Approver("ada", "admin"),
        approve=False,
        reason="customer already refunded",
    )
    result = await gateway.call(ask)
    assert result.status == "denied"
    assert result.code == "rejected"
    assert "already refunded" in (result.reason or "")
    assert CALLS["refund"] == 0


async def test_sla_escalates_then_expires(gateway: ToolGateway) -> None:
    settings = ApprovalSettings(sla=0.0001, on_timeout="escalate", escalate_to="cfo-office")
    ask = req("payments.refund", {"amount_cents": 9_000}, approval=settings)
    first = await gateway.call(ask)
    assert first.status == "pending_approval"
    escalated = await gateway.call(ask)
    assert escalated.status == "pending_approval"
    assert first.approval_id is not None
    request = await gateway.approvals.get(first.approval_id)
    assert request.approval_group == "cfo-office"
    assert request.escalations == 1
    expired = await gateway.call(ask)
    assert expired.code == "expired"


async def test_autonomy_levels_tighten_policy(gateway: ToolGateway) -> None:
    draft = await gateway.call(req("helpdesk.reply", {"ticket": "T-1"}, autonomy="draft_only"))
    assert draft.status == "drafted"
    waits = await gateway.call(
        req("helpdesk.reply", {"ticket": "T-1"}, autonomy="approve_writes", step_key="b")
    )
    assert waits.status == "pending_approval"
    runs = await gateway.call(
        req("helpdesk.reply", {"ticket": "T-1"}, autonomy="autonomous_low_risk", step_key="c")
    )
    assert runs.ok
    assert CALLS["reply"] == 1


async def test_budget_caps_stop_calls_and_charge_once(gateway: ToolGateway) -> None:
    await gateway.budgets.set_cap("default", "workflow:support", "micros", 5_000)
    ok = [await gateway.call(req("helpdesk.reply", {"ticket": "T"}, step_key=f"s{i}")) for i in range(3)]
    assert [r.status for r in ok] == ["ok", "ok", "denied"]
    assert ok[2].code == "budget_exceeded"
    await gateway.call(req("helpdesk.reply", {"ticket": "T"}, step_key="s0"))  # replay: no charge
    usage = await gateway.budgets.usage("default", "workflow:support", "micros")
    assert (usage.used, usage.reserved) == (4_000, 0)


async def test_kill_switch_stops_a_workflow(gateway: ToolGateway) -> None:
    await gateway.controls.pause("default", "support", "runaway replies", by="ops")
    result = await gateway.call(req("helpdesk.get_ticket", {"id": "T-1"}))
    assert result.code == "paused"
    await gateway.controls.resume("default", "support", by="ops")
    assert (await gateway.call(req("helpdesk.get_ticket", {"id": "T-1"}, step_key="x"))).ok


async def test_invalid_output_is_an_error_not_a_result(gateway: ToolGateway) -> None:
    result = await gateway.call(req("helpdesk.count", {}))
    assert result.status == "error"
    assert result.code == "invalid_output"


async def test_in_doubt_write_is_not_run_again(gateway: ToolGateway) -> None:
    ask = req("helpdesk.reply", {"ticket": "T-5"})
    tool = await gateway.registry.resolve("helpdesk.reply")
    from controltower.gateway.tools import args_digest

    # what a crash between "started" and "completed" leaves behind
    await gateway.calls.claim(
        ask.call_key,
        tenant="default",
        tool=tool.name,
        version=tool.version,
        digest=args_digest(tool.name, tool.version, ask.args),
        run_id="run_1",
        step_key="s",
        retry_in_doubt=False,
    )
    result = await gateway.call(ask)
    assert result.code == "in_doubt"
    assert CALLS["reply"] == 0


async def test_policies_naming_unknown_tools_fail_closed(store: SqlStore) -> None:
    gw = await open_gateway(store, policy_texts=POLICIES)
    await gw.registry.register(*TOOLS[0])  # the policies also name tools that are not registered
    result = await gw.call(req("helpdesk.get_ticket", {"id": "T-1"}))
    assert result.code == "policy_invalid"
    assert "payments.refund" in (result.reason or "")
    assert CALLS["lookup"] == 0


async def test_rate_limit_waits_or_stops(gateway: ToolGateway) -> None:
    gw = gateway
    limited = ToolDefinition(name="helpdesk.search", rate_limit=RateLimit(per_second=0.001, burst=2))
    await gw.registry.register(limited, lookup)
    gw.rate_wait = 0.05
    results = [await gw.call(req("helpdesk.search", {"id": "x"}, step_key=f"r{i}")) for i in range(3)]
    assert [r.status for r in results] == ["ok", "ok", "denied"], results
    assert results[2].code == "rate_limited"
    assert results[2].retryable


async def test_secrets_never_reach_audit_approvals_or_logs(
    gateway: ToolGateway, store: SqlStore, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.INFO)
    from controltower.gateway.secrets import install_log_redaction

    uninstall = install_log_redaction(gateway.redactor)
    try:
        ok = await gateway.call(req("helpdesk.reply", {"ticket": "T-1"}))
        assert ok.ok, ok
        # an agent that pastes the token into arguments gets it redacted from the records
        leak = await gateway.call(
            req("payments.refund", {"amount_cents": 10, "ticket": SECRET}, step_key="z")
        )
        assert leak.status == "pending_approval", leak
    finally:
        uninstall()
    assert SECRET not in caplog.text

    def dump(conn: sa.Connection) -> str:
        out = []
        for table in (t.audit, t.approvals, t.tool_calls, t.steps, t.signals):
            out += [repr(tuple(r)) for r in conn.execute(sa.select(table))]
        return "\n".join(out)

    assert SECRET not in await store.run(dump)
    exported = tmp_path / "audit.jsonl"
    await gateway.audit.export_jsonl(exported)
    assert SECRET not in exported.read_text()


@pytest.fixture(scope="module")
def spans() -> Any:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


async def test_each_call_is_an_execute_tool_span_without_secrets(gateway: ToolGateway, spans: Any) -> None:
    spans.clear()
    await gateway.call(req("helpdesk.reply", {"ticket": "T-1"}, agent="triage"))
    await gateway.call(req("crm.export_all", {}, step_key="q", workflow="marketing"))
    finished = spans.get_finished_spans()
    assert [s.name for s in finished] == ["execute_tool helpdesk.reply", "execute_tool crm.export_all"]
    first, second = (dict(s.attributes) for s in finished)
    assert first["gen_ai.operation.name"] == "execute_tool"
    assert first["gen_ai.agent.name"] == "triage"
    assert first["controltower.outcome"] == "ok"
    assert (second["controltower.outcome"], second["controltower.code"]) == ("denied", "no_grant")
    assert SECRET not in repr([dict(s.attributes) for s in finished])


async def test_autonomy_changes_are_audited_and_loosening_needs_a_second_person(
    gateway: ToolGateway, store: SqlStore
) -> None:
    from controltower.gateway.autonomy import AutonomyChangeError

    settings = gateway.autonomy
    scope = "workflow:support"
    write = {"ticket": "T-1"}
    assert (await gateway.call(req("helpdesk.reply", write, step_key="a"))).ok  # spec level: expanded
    tightened = await settings.request(
        "default", scope, "draft_only", by="ops", reason="bad replies", current="expanded"
    )
    assert tightened.status == "applied"
    assert (await gateway.call(req("helpdesk.reply", write, step_key="b"))).status == "drafted"
    loosened = await settings.request(
        "default", scope, "expanded", by="ops", reason="fixed", current="expanded"
    )
    assert loosened.status == "pending"
    assert (await gateway.call(req("helpdesk.reply", write, step_key="c"))).status == "drafted"
    with pytest.raises(AutonomyChangeError):
        await settings.approve("default", scope, by="ops")
    await settings.approve("default", scope, by="lead")
    assert (await gateway.call(req("helpdesk.reply", write, step_key="d"))).ok
    controls = [r for r in await audit_rows(store) if r["kind"] == "control"]
    assert len(controls) >= 3
    assert (await gateway.audit.verify()).ok
    # an agent never runs above its workflow's level
    await settings.request(
        "default", scope, "approve_writes", by="ops", reason="audit week", current="expanded"
    )
    agent_call = req("helpdesk.reply", write, step_key="e", agent="triage", agent_autonomy="expanded")
    assert (await gateway.call(agent_call)).status == "pending_approval"


async def test_notifier_hears_requests_escalations_and_decisions(gateway: ToolGateway) -> None:
    heard: list[tuple[str, str, str | None]] = []

    async def notify(event: str, request: Any) -> None:
        heard.append((event, request.tool, request.approval_group))

    gateway.notifier = notify
    settings = ApprovalSettings(sla=0.0001, on_timeout="escalate", escalate_to="cfo-office")
    ask = req("payments.refund", {"amount_cents": 7_000}, approval=settings)
    pending = await gateway.call(ask)
    await gateway.call(ask)  # past the SLA: escalated
    assert pending.approval_id is not None
    await gateway.decide(pending.approval_id, approver=Approver("ada", "admin"), approve=True)
    assert heard == [
        ("requested", "payments.refund", "finance"),
        ("escalated", "payments.refund", "cfo-office"),
        ("decided", "payments.refund", "cfo-office"),
    ]

    async def broken(event: str, request: Any) -> None:
        raise RuntimeError("slack is down")

    gateway.notifier = broken  # a failing notifier never blocks or loses the request
    other = await gateway.call(req("payments.refund", {"amount_cents": 7_000}, step_key="n2"))
    assert other.status == "pending_approval"
