"""Governance monitor rules (thresholds, sliding windows) and the kill switch they pull."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from controltower.gateway.audit import AuditEvent, AuditLog
from controltower.gateway.monitor import (
    Alert,
    BurstConfig,
    BurstRule,
    Controls,
    DenialConfig,
    DenialRule,
    Monitor,
    MonitorConfig,
    ProbingConfig,
    ProbingRule,
    SpendConfig,
    SpendRule,
)
from controltower.spec.errors import InvalidInputError
from controltower.store import SqlStore

T0 = 1_700_000_000.0


def call(
    tool: str = "crm.update",
    *,
    outcome: str = "executed",
    side_effect: str = "write",
    workflow: str | None = "refunds",
    actor: str = "agent-1",
    tenant: str = "acme",
    ts: float = T0,
    **data: Any,
) -> AuditEvent:
    return AuditEvent(
        tenant=tenant,
        actor=actor,
        kind="tool_call",
        subject=tool,
        workflow=workflow,
        outcome=outcome,
        ts=ts,
        data={"side_effect": side_effect, **data},
    )


def denial(tool: str = "crm.update", code: str = "policy_denied", **fields: Any) -> AuditEvent:
    return call(tool, outcome="denied", code=code, **fields)


# -- rules on their own -----------------------------------------------------------------------


def test_burst_fires_above_the_threshold_and_not_at_it() -> None:
    rule = BurstRule(BurstConfig(max_calls=3, window_seconds=10))
    assert [rule.observe(call(), T0 + i) for i in range(3)] == [None, None, None]
    alert = rule.observe(call(), T0 + 3)
    assert alert is not None
    assert (alert.rule, alert.observed, alert.threshold, alert.workflow) == ("burst", 4, 3, "refunds")
    assert alert.actions == ("alert", "pause_workflow")
    assert "crm.update" in alert.message
    assert rule.observe(call(), T0 + 4) is None  # the window starts afresh after an alert


def test_burst_counts_only_executed_writes_of_one_tool_and_workflow() -> None:
    rule = BurstRule(BurstConfig(max_calls=2, window_seconds=10))
    ignored = [
        call(side_effect="read"),
        call(outcome="denied"),
        call(outcome="failed"),
        AuditEvent(
            actor="a",
            kind="approval",
            outcome="executed",
            subject="crm.update",
            data={"side_effect": "write"},
        ),
    ]
    for i, event in enumerate(ignored * 3):
        assert rule.observe(event, T0 + i / 10) is None
    for i in range(2):  # two each: at the threshold, not above it
        for event in (call("a"), call("b"), call("a", workflow="other"), call("a", tenant="globex")):
            assert rule.observe(event, T0 + i) is None
    assert rule.observe(call("a", side_effect="irreversible"), T0 + 2) is not None


def test_burst_window_slides() -> None:
    rule = BurstRule(BurstConfig(max_calls=3, window_seconds=10))
    for t in (0, 1, 2):
        assert rule.observe(call(), T0 + t) is None
    assert rule.observe(call(), T0 + 10) is None  # t=0 has left the window: 3 calls in it
    assert rule.observe(call(), T0 + 10.5) is not None  # 1, 2, 10, 10.5: four within 10 s


def test_spend_fires_above_the_cap_and_slides() -> None:
    rule = SpendRule(SpendConfig(max_cost_micros=1000, window_seconds=60))
    assert rule.observe(call(cost_micros=400), T0) is None
    assert rule.observe(call(cost_micros=600), T0 + 1) is None  # exactly at the cap
    assert rule.observe(call(cost_micros=0), T0 + 2) is None
    assert rule.observe(call(cost_micros="lots"), T0 + 2) is None
    alert = rule.observe(call(cost_micros=1), T0 + 3)
    assert alert is not None
    assert (alert.rule, alert.observed, alert.threshold) == ("spend", 1001, 1000)
    assert alert.actions == ("alert",)
    # sliding: 900 at t=100, 900 at t=170 -> the first has expired
    assert rule.observe(call(cost_micros=900), T0 + 100) is None
    assert rule.observe(call(cost_micros=900), T0 + 170) is None
    assert rule.observe(call(cost_micros=200), T0 + 171) is not None


def test_spend_memory_is_bounded_without_losing_the_sum() -> None:
    rule = SpendRule(SpendConfig(max_cost_micros=10_000_000, window_seconds=3600))
    for i in range(SpendRule.MAX_ENTRIES + 500):
        assert rule.observe(call(cost_micros=1), T0 + i / 1000) is None
    spend = rule._windows.get(("acme", "refunds"))
    assert len(spend.entries) <= SpendRule.MAX_ENTRIES
    assert sum(cost for _, cost in spend.entries) == SpendRule.MAX_ENTRIES + 500
    assert spend.total == SpendRule.MAX_ENTRIES + 500  # the running total agrees with the entries


def test_spend_running_total_follows_the_window() -> None:
    """Expired entries leave the running total: the rule fires on what is inside the window only."""
    rule = SpendRule(SpendConfig(max_cost_micros=1000, window_seconds=10))
    for i in range(50):  # 600 micros every 20 s: never two inside one 10 s window
        assert rule.observe(call(cost_micros=600), T0 + 20 * i) is None
    assert rule._windows.get(("acme", "refunds")).total == 600
    assert rule.observe(call(cost_micros=401), T0 + 20 * 49 + 5) is not None


def test_repeated_denials_fire_per_agent_and_workflow() -> None:
    rule = DenialRule(DenialConfig(max_denials=2, window_seconds=60))
    assert rule.observe(denial(), T0) is None
    assert rule.observe(denial("other.tool"), T0 + 1) is None
    assert rule.observe(denial(actor="agent-2"), T0 + 2) is None  # another agent: its own count
    assert rule.observe(denial(code="paused"), T0 + 2) is None  # kill-switch denials never count
    assert rule.observe(call(), T0 + 2) is None
    alert = rule.observe(denial(), T0 + 3)
    assert alert is not None
    assert (alert.rule, alert.actor, alert.observed) == ("denials", "agent-1", 3)
    assert rule.observe(denial(), T0 + 100) is None
    assert rule.observe(denial(), T0 + 170) is None  # the one at t=100 has expired
    assert rule.observe(denial(), T0 + 171) is None
    assert rule.observe(denial(), T0 + 172) is not None


def test_probing_fires_on_distinct_ungranted_tools() -> None:
    rule = ProbingRule(ProbingConfig(distinct_tools=3, window_seconds=60))
    assert rule.observe(denial("a", code="no_grant"), T0) is None
    assert rule.observe(denial("a", code="no_grant"), T0 + 1) is None  # the same tool again
    assert rule.observe(denial("b", code="policy_denied"), T0 + 2) is None  # granted, denied by policy
    assert rule.observe(denial("b", code="no_grant", actor="agent-2"), T0 + 3) is None
    assert rule.observe(denial("b", code="no_grant"), T0 + 4) is None
    alert = rule.observe(denial("c", code="no_grant"), T0 + 5)
    assert alert is not None
    assert (alert.rule, alert.observed, alert.threshold) == ("probing", 3, 3)
    assert alert.details["tools"] == ["a", "b", "c"]
    # sliding: a at t=100, b at t=130, c at t=161 -> a has expired
    for tool, t in (("a", 100), ("b", 130), ("c", 161)):
        assert rule.observe(denial(tool, code="no_grant"), T0 + t) is None
    assert rule.observe(denial("d", code="no_grant"), T0 + 162) is not None


def test_windows_are_bounded_in_keys() -> None:
    rule = BurstRule(BurstConfig(max_calls=1, window_seconds=60), max_keys=5)
    for i in range(100):
        rule.observe(call(workflow=f"wf-{i}"), T0)
    assert len(rule._windows) == 5


# -- the monitor with a store ----------------------------------------------------------------


async def test_monitor_pauses_the_workflow_records_and_notifies(store: SqlStore) -> None:
    audit = AuditLog(store)
    alerts: list[Alert] = []

    async def notify(alert: Alert) -> None:
        alerts.append(alert)

    config = MonitorConfig(burst=BurstConfig(max_calls=3, window_seconds=60))
    monitor = Monitor(audit, config=config, notifier=notify)
    monitor.attach()
    assert await monitor.controls.is_paused("acme", "refunds") is None
    for i in range(3):
        await audit.append(call(ts=T0 + i))
    assert alerts == []
    assert await monitor.controls.is_paused("acme", "refunds") is None
    await audit.append(call(ts=T0 + 3))

    assert [a.rule for a in alerts] == ["burst"]
    reason = await monitor.controls.is_paused("acme", "refunds")
    assert reason is not None
    assert "burst" in reason
    assert await monitor.controls.is_paused("acme", "other") is None
    assert await Controls(store).is_paused("acme", "refunds") == reason  # durable, not just cached

    records = await audit.query("acme")
    assert [(r.kind, r.outcome) for r in records] == [("tool_call", "executed")] * 4 + [
        ("control", "paused"),
        ("monitor_alert", "alert"),
    ]
    control_record, alert_record = records[-2:]
    assert alert_record.subject == "burst"
    assert alert_record.data["trigger_seq"] == 4
    assert alert_record.data["observed"] == 4
    assert alert_record.data["paused"] is True
    assert control_record.actor == "monitor"
    assert control_record.workflow == "refunds"
    assert (await audit.verify()).ok


async def test_alert_only_rule_does_not_pause(store: SqlStore) -> None:
    audit = AuditLog(store)
    monitor = Monitor(audit, config=MonitorConfig(denials=DenialConfig(max_denials=1, window_seconds=60)))
    alerts = [await monitor.observe(denial(ts=T0 + i)) for i in range(2)]
    assert alerts[0] == []
    assert [a.rule for a in alerts[1]] == ["denials"]
    assert await monitor.controls.is_paused("acme", "refunds") is None
    assert [r.kind for r in await audit.query("acme")] == ["monitor_alert"]


async def test_a_failing_notifier_does_not_stop_the_pause(store: SqlStore) -> None:
    audit = AuditLog(store)

    async def broken(alert: Alert) -> None:
        raise RuntimeError("pager down")

    config = MonitorConfig(probing=ProbingConfig(distinct_tools=2, window_seconds=60))
    monitor = Monitor(audit, config=config, notifier=broken)
    await monitor.observe(denial("a", code="no_grant", ts=T0))
    fired = await monitor.observe(denial("b", code="no_grant", ts=T0 + 1))
    assert [a.rule for a in fired] == ["probing"]
    assert await monitor.controls.is_paused("acme", "refunds") is not None


async def test_monitor_ignores_its_own_records(store: SqlStore) -> None:
    audit = AuditLog(store)
    config = MonitorConfig(
        denials=DenialConfig(max_denials=1, window_seconds=60, actions=("alert", "pause_workflow"))
    )
    monitor = Monitor(audit, config=config)
    monitor.attach()
    for i in range(4):
        await audit.append(denial(ts=T0 + i))
    kinds = [r.kind for r in await audit.query("acme")]
    # two alerts (after the 2nd and 4th denial), one pause: no alert about alerts or controls
    assert kinds.count("monitor_alert") == 2
    assert kinds.count("control") == 1


# -- the kill switch -------------------------------------------------------------------------


async def test_manual_pause_and_resume(store: SqlStore) -> None:
    audit = AuditLog(store)
    controls = Controls(store, audit=audit)
    assert await controls.pause("acme", "refunds", "suspicious refunds", by="ops@acme") is True
    assert await controls.pause("acme", "refunds", "again", by="ops@acme") is False  # already paused
    assert await controls.is_paused("acme", "refunds") == "suspicious refunds"
    assert await controls.is_paused("globex", "refunds") is None  # tenants are separate
    paused = await controls.paused("acme")
    assert [(p.workflow, p.reason, p.changed_by) for p in paused] == [
        ("refunds", "suspicious refunds", "ops@acme")
    ]

    assert await controls.resume("acme", "refunds", by="lead@acme", reason="checked") is True
    assert await controls.resume("acme", "refunds", by="lead@acme") is False
    assert await controls.is_paused("acme", "refunds") is None
    assert await controls.paused("acme") == []

    records = await audit.query("acme", kind="control")
    assert [(r.outcome, r.actor, r.reason) for r in records] == [
        ("paused", "ops@acme", "suspicious refunds"),
        ("resumed", "lead@acme", "checked"),
    ]
    assert records[1].data["previous"] is True
    with pytest.raises(InvalidInputError, match="reason"):
        await controls.pause("acme", "refunds", "  ", by="ops")


async def test_other_processes_see_a_pause_within_the_cache_ttl(store: SqlStore) -> None:
    writer = Controls(store)
    slow = Controls(store, cache_ttl=60)
    fresh = Controls(store, cache_ttl=0)
    short = Controls(store, cache_ttl=0.2)
    for reader in (slow, fresh, short):
        assert await reader.is_paused("acme", "refunds") is None
    await writer.pause("acme", "refunds", "incident 42", by="ops")
    assert await slow.is_paused("acme", "refunds") is None  # stale: within its TTL
    assert await fresh.is_paused("acme", "refunds") == "incident 42"
    await asyncio.sleep(0.25)
    assert await short.is_paused("acme", "refunds") == "incident 42"  # TTL passed
    assert [p.workflow for p in await slow.paused("acme")] == ["refunds"]  # listing reads fresh


async def test_concurrent_checks_share_one_read(store: SqlStore) -> None:
    controls = Controls(store)
    await Controls(store).pause("acme", "refunds", "incident", by="ops")
    before = store.commits
    results = await asyncio.gather(*(controls.is_paused("acme", "refunds") for _ in range(100)))
    assert results == ["incident"] * 100
    assert store.commits - before == 1
    await asyncio.gather(*(controls.is_paused("acme", "refunds") for _ in range(100)))
    assert store.commits - before == 1  # served from the cache


async def test_generic_control_values(store: SqlStore) -> None:
    audit = AuditLog(store)
    controls = Controls(store, audit=audit)
    assert await controls.get_value("acme", "agent:triage", "autonomy") is None
    await controls.set_value("acme", "agent:triage", "autonomy", "approve_writes", "new agent", by="ops")
    await controls.set_value("acme", "workflow:refunds", "autonomy", {"level": "draft_only"}, None, by="ops")
    assert await controls.get_value("acme", "agent:triage", "autonomy") == "approve_writes"
    assert await Controls(store).get_value("acme", "workflow:refunds", "autonomy") == {"level": "draft_only"}
    value = await controls.get("acme", "agent:triage", "autonomy")
    assert value is not None
    assert (value.reason, value.changed_by, value.workflow) == ("new agent", "ops", None)
    await controls.set_value("acme", "agent:triage", "autonomy", None, "back to default", by="ops")
    assert await controls.get_value("acme", "agent:triage", "autonomy") is None
    assert await Controls(store).get_value("acme", "agent:triage", "autonomy") is None
    records = await audit.query("acme", kind="control")
    assert [(r.subject, r.outcome) for r in records] == [
        ("agent:triage#autonomy", "set"),
        ("workflow:refunds#autonomy", "set"),
        ("agent:triage#autonomy", "cleared"),
    ]
    assert records[1].workflow == "refunds"
    assert records[2].data["previous"] == "approve_writes"
    with pytest.raises(InvalidInputError, match="key"):
        await controls.set_value("acme", "agent:x", "k" * 41, 1, None, by="ops")
