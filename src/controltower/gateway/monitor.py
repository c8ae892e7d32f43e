"""The governance monitor and the kill switch.

The monitor watches audit records as they are appended and looks for patterns no
single policy decision can see: a burst of the same write, a spend spike, an agent
denied again and again, an agent probing tools it has no grant for. Each pattern is a
small :class:`Rule` with a sliding window held in memory (bounded per key and in the
number of keys). A firing rule leaves a ``monitor_alert`` record in the audit trail and
runs its configured actions: ``alert`` (the notifier callback) and ``pause_workflow``
(the kill switch in :class:`Controls`).

Windows live in one process: with several engine processes each monitor sees the
records its own process appends, so thresholds apply per process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field

from controltower.gateway.audit import AuditEvent, AuditLog, AuditRecord
from controltower.spec.errors import InvalidInputError
from controltower.store import tables as t
from controltower.store.sql import SqlStore, dumps

log = logging.getLogger(__name__)

Action = Literal["alert", "pause_workflow"]
IGNORED_KINDS = frozenset({"monitor_alert", "control"})  # the monitor's own records never trigger it
S = TypeVar("S")


# -- configuration ---------------------------------------------------------------------------


class _RuleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    window_seconds: float = Field(default=60.0, gt=0)
    actions: tuple[Action, ...] = ("alert",)


class BurstConfig(_RuleConfig):
    """More than ``max_calls`` executed calls of one write tool by one workflow within the window."""

    max_calls: int = Field(default=20, ge=1)
    actions: tuple[Action, ...] = ("alert", "pause_workflow")


class SpendConfig(_RuleConfig):
    """More than ``max_cost_micros`` (``data.cost_micros`` summed) by one workflow within the window."""

    max_cost_micros: int = Field(default=50_000_000, ge=1)  # $50
    window_seconds: float = Field(default=300.0, gt=0)


class DenialConfig(_RuleConfig):
    """More than ``max_denials`` denied calls for one agent in one workflow within the window.

    Denials whose ``data.code`` is in ``ignore_codes`` do not count: once a workflow is
    paused every call is denied with ``paused``, and that must not raise more alerts.
    """

    max_denials: int = Field(default=10, ge=1)
    window_seconds: float = Field(default=300.0, gt=0)
    ignore_codes: tuple[str, ...] = ("paused",)


class ProbingConfig(_RuleConfig):
    """An agent denied for ``distinct_tools`` different tools it has no grant for within the window."""

    distinct_tools: int = Field(default=3, ge=1)
    window_seconds: float = Field(default=600.0, gt=0)
    codes: tuple[str, ...] = ("no_grant",)
    actions: tuple[Action, ...] = ("alert", "pause_workflow")


class MonitorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    burst: BurstConfig = BurstConfig()
    spend: SpendConfig = SpendConfig()
    denials: DenialConfig = DenialConfig()
    probing: ProbingConfig = ProbingConfig()
    max_keys: int = Field(default=10_000, ge=1, description="Windows kept per rule; least recent dropped.")


# -- rules -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Alert:
    rule: str
    tenant: str
    workflow: str | None
    actor: str
    message: str
    observed: int
    threshold: int
    window_seconds: float
    actions: tuple[Action, ...]
    run_id: str | None = None
    trigger_seq: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "observed": self.observed,
            "threshold": self.threshold,
            "window_seconds": self.window_seconds,
            "actions": list(self.actions),
            "trigger_seq": self.trigger_seq,
            **self.details,
        }


class Rule(Protocol):
    name: str
    actions: tuple[Action, ...]

    def observe(self, record: AuditEvent, now: float) -> Alert | None: ...


class _Windows(Generic[S]):
    """Per-key state with least-recently-used eviction: memory stays bounded under any key churn."""

    def __init__(self, max_keys: int, factory: Callable[[], S]) -> None:
        self._items: OrderedDict[Hashable, S] = OrderedDict()
        self._max = max_keys
        self._factory = factory

    def get(self, key: Hashable) -> S:
        item = self._items.get(key)
        if item is None:
            item = self._items[key] = self._factory()
            if len(self._items) > self._max:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        return item

    def drop(self, key: Hashable) -> None:
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


def _expire(times: deque[float], cutoff: float) -> None:
    while times and times[0] <= cutoff:
        times.popleft()


def _alert(
    rule: Rule, record: AuditEvent, message: str, observed: int, threshold: int, window: float, **details: Any
) -> Alert:
    return Alert(
        rule=rule.name,
        tenant=record.tenant,
        workflow=record.workflow,
        actor=record.actor,
        message=message,
        observed=observed,
        threshold=threshold,
        window_seconds=window,
        actions=rule.actions,
        run_id=record.run_id,
        trigger_seq=record.seq if isinstance(record, AuditRecord) else None,
        details=details,
    )


def _who(record: AuditEvent) -> str:
    return record.workflow or f"agent:{record.actor}"


class _CountRule:
    """Fires when more than ``limit`` matching records share a key within the window.

    Only the newest ``limit + 1`` timestamps per key are kept: enough to decide, and
    bounded. After firing, the key's window starts afresh, so a sustained burst raises
    one alert per ``limit + 1`` events rather than one per event.
    """

    name = "count"

    def __init__(self, limit: int, window: float, actions: tuple[Action, ...], max_keys: int) -> None:
        self.limit = limit
        self.window = window
        self.actions = actions
        self._windows: _Windows[deque[float]] = _Windows(max_keys, lambda: deque(maxlen=limit + 1))

    def key(self, record: AuditEvent) -> Hashable | None:
        raise NotImplementedError

    def message(self, record: AuditEvent, count: int) -> str:
        raise NotImplementedError

    def observe(self, record: AuditEvent, now: float) -> Alert | None:
        key = self.key(record)
        if key is None:
            return None
        times = self._windows.get(key)
        times.append(now)
        _expire(times, now - self.window)
        if len(times) <= self.limit:
            return None
        self._windows.drop(key)
        return _alert(self, record, self.message(record, len(times)), len(times), self.limit, self.window)


class BurstRule(_CountRule):
    name = "burst"

    def __init__(self, config: BurstConfig, max_keys: int = 10_000) -> None:
        super().__init__(config.max_calls, config.window_seconds, config.actions, max_keys)

    def key(self, record: AuditEvent) -> Hashable | None:
        if record.kind != "tool_call" or record.outcome != "executed":
            return None
        if record.data.get("side_effect") in (None, "read"):
            return None
        return (record.tenant, _who(record), record.subject)

    def message(self, record: AuditEvent, count: int) -> str:
        return (
            f"{_who(record)} executed the {record.data.get('side_effect')} tool {record.subject} "
            f"{count} times within {self.window:g}s (more than {self.limit})"
        )


class DenialRule(_CountRule):
    name = "denials"

    def __init__(self, config: DenialConfig, max_keys: int = 10_000) -> None:
        super().__init__(config.max_denials, config.window_seconds, config.actions, max_keys)
        self.ignore = frozenset(config.ignore_codes)

    def key(self, record: AuditEvent) -> Hashable | None:
        if record.outcome != "denied" or record.data.get("code") in self.ignore:
            return None
        return (record.tenant, record.workflow, record.actor)

    def message(self, record: AuditEvent, count: int) -> str:
        where = f" in workflow {record.workflow}" if record.workflow else ""
        return (
            f"agent {record.actor}{where} was denied {count} times within {self.window:g}s (max {self.limit})"
        )


class _Spend:
    """One key's window: (time, cost) entries and their running sum."""

    __slots__ = ("entries", "total")

    def __init__(self) -> None:
        self.entries: deque[list[float]] = deque()
        self.total: float = 0  # stays an exact int while every cost is one


class SpendRule:
    """Fires when the cost recorded for one workflow (or ad-hoc agent) exceeds a cap within the window.

    Entries are exact up to 4096 per key; beyond that the two oldest are merged (the sum is
    kept, the merged entry expires with the newer one), so memory stays bounded. The window's
    sum is kept as a running total (exact for whole micros): observing a record costs O(1),
    not O(window).
    """

    name = "spend"
    MAX_ENTRIES = 4096

    def __init__(self, config: SpendConfig, max_keys: int = 10_000) -> None:
        self.limit = config.max_cost_micros
        self.window = config.window_seconds
        self.actions = config.actions
        self._windows: _Windows[_Spend] = _Windows(max_keys, _Spend)

    def observe(self, record: AuditEvent, now: float) -> Alert | None:
        cost = record.data.get("cost_micros")
        if not isinstance(cost, int | float) or isinstance(cost, bool) or cost <= 0:
            return None
        key = (record.tenant, _who(record))
        spend = self._windows.get(key)
        entries = spend.entries
        entries.append([now, cost])
        spend.total += cost
        while entries and entries[0][0] <= now - self.window:
            spend.total -= entries.popleft()[1]
        if len(entries) > self.MAX_ENTRIES:
            oldest = entries.popleft()
            entries[0][1] += oldest[1]
        if not entries:
            spend.total = 0
        total = int(spend.total)
        if total <= self.limit:
            return None
        self._windows.drop(key)
        message = f"{_who(record)} spent {total} micros within {self.window:g}s (cap {self.limit})"
        return _alert(self, record, message, total, self.limit, self.window)


class ProbingRule:
    """Fires when one agent is denied for ``distinct_tools`` tools it has no grant for within the window."""

    name = "probing"

    def __init__(self, config: ProbingConfig, max_keys: int = 10_000) -> None:
        self.limit = config.distinct_tools
        self.window = config.window_seconds
        self.actions = config.actions
        self.codes = frozenset(config.codes)
        self._windows: _Windows[OrderedDict[str, float]] = _Windows(max_keys, OrderedDict)

    def observe(self, record: AuditEvent, now: float) -> Alert | None:
        if record.outcome != "denied" or not record.subject:
            return None
        if record.data.get("code") not in self.codes and record.data.get("reason_code") not in self.codes:
            return None
        key = (record.tenant, record.actor)
        tools = self._windows.get(key)
        tools.pop(record.subject, None)
        tools[record.subject] = now  # newest last
        while tools and next(iter(tools.values())) <= now - self.window:
            tools.popitem(last=False)
        if len(tools) < self.limit:
            return None
        self._windows.drop(key)
        names = sorted(tools)
        message = (
            f"agent {record.actor} tried {len(names)} tools it has no grant for within {self.window:g}s: "
            + ", ".join(names)
        )
        return _alert(self, record, message, len(names), self.limit, self.window, tools=names)


def default_rules(config: MonitorConfig) -> list[Rule]:
    every: list[tuple[bool, Rule]] = [
        (config.burst.enabled, BurstRule(config.burst, config.max_keys)),
        (config.spend.enabled, SpendRule(config.spend, config.max_keys)),
        (config.denials.enabled, DenialRule(config.denials, config.max_keys)),
        (config.probing.enabled, ProbingRule(config.probing, config.max_keys)),
    ]
    return [rule for enabled, rule in every if enabled]


# -- the monitor -----------------------------------------------------------------------------

AlertNotifier = Callable[[Alert], Awaitable[None]]


class Monitor:
    """Feeds audit records to the rules and carries out what a firing rule asks for."""

    def __init__(
        self,
        audit: AuditLog,
        controls: Controls | None = None,
        config: MonitorConfig | None = None,
        *,
        notifier: AlertNotifier | None = None,
        rules: Sequence[Rule] | None = None,
    ) -> None:
        self.audit = audit
        self.controls = controls or Controls(audit.store, audit=audit)
        self.config = config or MonitorConfig()
        self.notifier = notifier
        self.rules = list(rules) if rules is not None else default_rules(self.config)

    def attach(self) -> None:
        """Watch every record appended through ``audit`` from now on."""
        self.audit.add_listener(self.observe)

    async def observe(self, record: AuditEvent, now: float | None = None) -> list[Alert]:
        """Run the rules on one record (``now`` defaults to its timestamp) and act on what fires."""
        if record.kind in IGNORED_KINDS:
            return []
        when = now if now is not None else record.ts if record.ts is not None else time.time()
        alerts: list[Alert] = []
        for rule in self.rules:
            try:
                alert = rule.observe(record, when)
            except Exception:  # one broken rule must not blind the others
                log.exception("monitor rule %s failed", getattr(rule, "name", rule))
                continue
            if alert is not None:
                alerts.append(alert)
        for alert in alerts:
            await self._act(alert)
        return alerts

    async def _act(self, alert: Alert) -> None:
        """Pause first (the kill switch must not depend on anything else succeeding), then record."""
        pause = "pause_workflow" in alert.actions and alert.workflow is not None
        if pause and alert.workflow is not None:
            reason = f"monitor rule {alert.rule}: {alert.message}"
            await self.controls.pause(alert.tenant, alert.workflow, reason[:2000], by="monitor")
        await self.audit.append(
            AuditEvent(
                tenant=alert.tenant,
                actor="monitor",
                kind="monitor_alert",
                subject=alert.rule,
                outcome="alert",
                run_id=alert.run_id,
                workflow=alert.workflow,
                reason=alert.message,
                data={**alert.to_dict(), "agent": alert.actor, "paused": pause},
            )
        )
        if "alert" in alert.actions and self.notifier is not None:
            try:
                await self.notifier(alert)
            except Exception:  # the alert is in the audit trail; a broken notifier only loses the ping
                log.exception("monitor notifier failed for rule %s", alert.rule)


# -- controls: kill switches and overrides ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class ControlValue:
    tenant: str
    scope: str
    key: str
    value: Any
    reason: str | None
    changed_by: str | None
    updated_at: float

    @property
    def workflow(self) -> str | None:
        return self.scope[len("workflow:") :] if self.scope.startswith("workflow:") else None


_Snapshot = dict[tuple[str, str], ControlValue]


class Controls:
    """Kill switches (``workflow:<name>`` / ``paused``) and other control values, per tenant.

    Reads are served from a per-tenant snapshot of the ``controls`` rows, cached for
    ``cache_ttl`` seconds, so :meth:`is_paused` costs a dict lookup on the hot path.
    Changes made through this instance update the snapshot at once; a change made by
    another process is seen here within ``cache_ttl`` seconds (set 0 to always read).
    Every change is written together with its ``control`` audit record, in one transaction.
    """

    def __init__(self, store: SqlStore, *, audit: AuditLog | None = None, cache_ttl: float = 1.0) -> None:
        self.store = store
        self.audit = audit if audit is not None else AuditLog(store)
        self.cache_ttl = cache_ttl
        self._cache: dict[str, tuple[float, _Snapshot]] = {}
        self._versions: dict[str, int] = {}
        self._loading: dict[str, asyncio.Future[_Snapshot]] = {}

    async def pause(self, tenant: str, workflow: str, reason: str, by: str) -> bool:
        """Stop new tool calls of ``workflow``; False if it was already paused (nothing recorded)."""
        if not reason or not reason.strip():
            raise InvalidInputError(
                "pausing a workflow needs a reason", hint="say why, for whoever resumes it"
            )
        return await self._change(
            tenant, _scope(workflow), "paused", True, reason, by, "paused", only_changes=True
        )

    async def resume(self, tenant: str, workflow: str, by: str, reason: str | None = None) -> bool:
        """Let ``workflow`` call tools again; False if it was not paused."""
        return await self._change(
            tenant, _scope(workflow), "paused", None, reason, by, "resumed", only_changes=True
        )

    async def is_paused(self, tenant: str, workflow: str) -> str | None:
        """The reason ``workflow`` is paused, or None. Cheap: see the class notes on caching."""
        found = (await self._snapshot(tenant)).get((_scope(workflow), "paused"))
        return None if found is None else (found.reason or "paused")

    async def paused(self, tenant: str) -> list[ControlValue]:
        """Every paused workflow of ``tenant``, read fresh from the store."""
        snapshot = await self._snapshot(tenant, fresh=True)
        return sorted(
            (v for (s, k), v in snapshot.items() if k == "paused" and v.workflow), key=lambda v: v.scope
        )

    async def set_value(
        self, tenant: str, scope: str, key: str, value: Any, reason: str | None, by: str
    ) -> bool:
        """Set a control value (any JSON); ``None`` clears it. Always recorded in the audit trail."""
        outcome = "cleared" if value is None else "set"
        return await self._change(tenant, scope, key, value, reason, by, outcome, only_changes=False)

    async def get_value(self, tenant: str, scope: str, key: str) -> Any:
        found = await self.get(tenant, scope, key)
        return None if found is None else found.value

    async def get(self, tenant: str, scope: str, key: str) -> ControlValue | None:
        return (await self._snapshot(tenant)).get((scope, key))

    async def _change(
        self,
        tenant: str,
        scope: str,
        key: str,
        value: Any,
        reason: str | None,
        by: str,
        outcome: str,
        *,
        only_changes: bool,
    ) -> bool:
        _check(tenant, scope, key, by)
        text = None if value is None else dumps(value)
        now = time.time()

        def job(conn: sa.Connection) -> list[AuditRecord] | None:
            pk = (t.controls.c.tenant == tenant, t.controls.c.scope == scope, t.controls.c.key == key)
            current = conn.execute(sa.select(t.controls.c.value).where(*pk)).first()
            previous = None if current is None or current[0] is None else json.loads(current[0])
            if only_changes and (current is None) == (value is None):
                return None
            if value is None:
                conn.execute(t.controls.delete().where(*pk))
            else:
                row = {"value": text, "reason": reason, "changed_by": by, "updated_at": now}
                stmt = self.store.insert(t.controls).values(tenant=tenant, scope=scope, key=key, **row)
                conn.execute(stmt.on_conflict_do_update(index_elements=["tenant", "scope", "key"], set_=row))
            workflow = scope[len("workflow:") :] if scope.startswith("workflow:") else None
            event = AuditEvent(
                ts=now,
                tenant=tenant,
                actor=by,
                kind="control",
                subject=f"{scope}#{key}"[:300],
                workflow=workflow if workflow and len(workflow) <= 100 else None,
                outcome=outcome,
                reason=reason,
                data={"scope": scope, "key": key, "value": value, "previous": previous},
            )
            return self.audit.append_in(conn, [event])

        records = await self.store.run(job)
        if records is None:
            return False
        self._versions[tenant] = self._versions.get(tenant, 0) + 1
        cached = self._cache.get(tenant)
        if cached is not None:
            snapshot = dict(cached[1])
            if value is None:
                snapshot.pop((scope, key), None)
            else:
                snapshot[(scope, key)] = ControlValue(
                    tenant, scope, key, json.loads(text or "null"), reason, by, now
                )
            self._cache[tenant] = (cached[0], snapshot)
        await self.audit.publish(records)
        return True

    async def _snapshot(self, tenant: str, *, fresh: bool = False) -> _Snapshot:
        cached = self._cache.get(tenant)
        if not fresh and cached is not None and cached[0] > time.monotonic():
            return cached[1]
        loading = self._loading.get(tenant)
        if loading is None or fresh:  # one query serves every caller that missed at the same moment
            loading = asyncio.ensure_future(self._load(tenant))
            if not fresh:
                self._loading[tenant] = loading
                loading.add_done_callback(lambda _: self._loading.pop(tenant, None))
        return await asyncio.shield(loading)

    async def _load(self, tenant: str) -> _Snapshot:
        version = self._versions.get(tenant, 0)
        stmt = sa.select(t.controls).where(t.controls.c.tenant == tenant)
        rows = await self.store.run(lambda conn: conn.execute(stmt).all())
        snapshot = {(row.scope, row.key): _control(row) for row in rows}
        if self._versions.get(tenant, 0) == version:  # no local change raced this read
            self._cache[tenant] = (time.monotonic() + self.cache_ttl, snapshot)
        return snapshot


def _control(row: sa.Row[Any]) -> ControlValue:
    value = None if row.value is None else json.loads(row.value)
    return ControlValue(row.tenant, row.scope, row.key, value, row.reason, row.changed_by, row.updated_at)


def _scope(workflow: str) -> str:
    return f"workflow:{workflow}"


def _check(tenant: str, scope: str, key: str, by: str) -> None:
    for name, value, limit in (
        ("tenant", tenant, 64),
        ("scope", scope, 300),
        ("key", key, 40),
        ("by", by, 200),
    ):
        if not value or len(value) > limit:
            raise InvalidInputError(f"control {name} must be 1 to {limit} characters")
