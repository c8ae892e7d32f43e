"""The notifier: fans notifications out to channels in the background, with retries.

Sending never blocks or breaks what triggered it (an approval request, a failing run). With a
store, every notification is first written to the ``notifications`` outbox and a sender loop
delivers it with backoff, also after a restart (:mod:`controltower.notify.outbox`); without
one, a delivery runs as an in-memory task, retried with exponential backoff and jitter, and a
final failure is logged. Plug it in with :meth:`Notifier.attach` (the gateway's approval
notifier hook, the engine's approval-step and run-failure hooks) and :meth:`Notifier.start`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa

from controltower.engine.interpreter import StepApproval
from controltower.gateway.approvals import ApprovalRequest
from controltower.notify.channels import Channel, DeliveryError, EmailChannel, WebhookChannel
from controltower.notify.messages import (
    EVENTS,
    Notification,
    approval_notification,
    run_failed_notification,
    step_approval_notification,
)
from controltower.notify.outbox import Outbox
from controltower.spec.errors import InvalidInputError
from controltower.store import RunRecord, SqlStore
from controltower.store import tables as t

log = logging.getLogger("controltower.notify")

DEFAULT_EVENTS = frozenset({"approval_requested", "approval_escalated", "approval_expired", "run_failed"})


class Notifier:
    def __init__(
        self,
        channels: Sequence[Channel],
        *,
        base_url: str = "http://127.0.0.1:8000",
        events: Iterable[str] = DEFAULT_EVENTS,
        attempts: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        store: SqlStore | None = None,
        poll_interval: float = 2.0,
    ) -> None:
        unknown = set(events) - set(EVENTS)
        if unknown:
            raise InvalidInputError(
                f"unknown notification event(s): {', '.join(sorted(unknown))}",
                hint=f"use {', '.join(EVENTS)}",
            )
        self.channels = list(channels)
        self.base_url = base_url.rstrip("/")
        self.events = frozenset(events)
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.delivered: list[tuple[str, str, str]] = []  # (channel, event, subject id)
        self.failed: list[tuple[str, str, str]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._last: dict[int, asyncio.Task[None]] = {}
        self._gateway: Any = None
        self._catch_up: asyncio.Task[int] | None = None
        self.outbox: Outbox | None = None
        if store is not None:  # durable: through the notifications table
            self.outbox = Outbox(
                store,
                self.channels,
                attempts=self.attempts,
                backoff=backoff,
                max_backoff=max_backoff,
                poll_interval=poll_interval,
            )
            self.outbox.delivered, self.outbox.failed = self.delivered, self.failed

    @classmethod
    def from_env(
        cls, base_url: str | None = None, env: dict[str, str] | None = None, *, store: SqlStore | None = None
    ) -> Notifier | None:
        """Channels from the environment; None when none is configured.

        With ``store``, deliveries go through the durable outbox (call :meth:`start`).

        ``TOWER_NOTIFY_WEBHOOK_URL``; ``TOWER_SMTP_HOST`` (+ ``_PORT``, ``_USER``, ``_PASSWORD``,
        ``_FROM``, ``_SECURITY`` none|starttls|ssl) with ``TOWER_NOTIFY_EMAIL_TO`` (comma-separated);
        ``TOWER_NOTIFY_EVENTS`` (comma-separated, default approvals requested/escalated/expired and
        run failures); ``TOWER_BASE_URL`` for the dashboard links.
        """
        e = os.environ if env is None else env
        channels: list[Channel] = []
        try:
            if e.get("TOWER_NOTIFY_WEBHOOK_URL"):
                channels.append(WebhookChannel(e["TOWER_NOTIFY_WEBHOOK_URL"]))
            if e.get("TOWER_SMTP_HOST"):
                port = int(e.get("TOWER_SMTP_PORT") or 25)
                security = e.get("TOWER_SMTP_SECURITY") or {587: "starttls", 465: "ssl"}.get(port, "none")
                if security not in ("none", "starttls", "ssl"):
                    raise ValueError("TOWER_SMTP_SECURITY is none, starttls or ssl")
                channels.append(
                    EmailChannel(
                        host=e["TOWER_SMTP_HOST"],
                        port=port,
                        sender=e.get("TOWER_SMTP_FROM") or "control-tower@localhost",
                        recipients=[
                            a.strip() for a in (e.get("TOWER_NOTIFY_EMAIL_TO") or "").split(",") if a.strip()
                        ],
                        username=e.get("TOWER_SMTP_USER") or None,
                        password=e.get("TOWER_SMTP_PASSWORD") or None,
                        security=security,  # type: ignore[arg-type]
                    )
                )
        except ValueError as exc:
            hint = "check the TOWER_NOTIFY_* and TOWER_SMTP_* variables"
            raise InvalidInputError(f"notification settings: {exc}", hint=hint) from None
        if not channels:
            return None
        events = _split(e.get("TOWER_NOTIFY_EVENTS"))
        url = base_url or e.get("TOWER_BASE_URL") or "http://127.0.0.1:8000"
        return cls(channels, base_url=url, events=events or DEFAULT_EVENTS, store=store)

    def attach(self, *, engine: Any = None, gateway: Any = None) -> None:
        """Receive the gateway's approval events, the engine's approval steps and run failures."""
        if gateway is not None:
            self._gateway = gateway
            previous = gateway.notifier
            if previous is None or previous == self.on_approval:
                gateway.notifier = self.on_approval
            elif getattr(previous, "tower_notifier", None) is not self:
                # keep whoever listened before; the gateway shields the action from our errors

                async def both(event: str, appr: ApprovalRequest) -> None:
                    try:
                        await previous(event, appr)
                    finally:
                        await self.on_approval(event, appr)

                both.tower_notifier = self  # type: ignore[attr-defined]
                gateway.notifier = both
        if engine is not None and self.on_run_failed not in engine.failure_hooks:
            engine.failure_hooks.append(self.on_run_failed)
        if engine is not None and self.on_step_approval not in engine.approval_hooks:
            engine.approval_hooks.append(self.on_step_approval)

    def start(self) -> None:
        """Start delivering from the outbox (rows left by an earlier process too); no-op without one.

        Also catch up on approvals that wait without a notification (the workflows' approval
        steps, and with a gateway attached its pending calls): a wait is committed before its
        notification is enqueued, so a crash in between, or a run parked while no notifier was
        running, would otherwise leave it unannounced (the outbox ignores what it already holds).
        """
        if self.outbox is not None:
            self.outbox.start()
            if self._catch_up is None:
                self._catch_up = asyncio.get_running_loop().create_task(self.catch_up(self._gateway))

    async def catch_up(self, gateway: Any = None, limit: int = 1000) -> int:
        """Enqueue "approval requested" for every pending gateway approval (with ``gateway``)
        and every workflow approval step that waits; returns how many rows were new (0 when
        every one was already announced: the hooks and this build the same dedupe keys)."""
        if self.outbox is None or "approval_requested" not in self.events:
            return 0
        added = 0
        try:
            if gateway is not None:
                for appr in await gateway.approvals.list(tenant=None, limit=limit):
                    added += await self.outbox.enqueue(
                        approval_notification("requested", appr, self.base_url)
                    )
            for run, step in await waiting_approval_steps(self.outbox.store, limit):
                added += await self.outbox.enqueue(step_approval_notification(run, step, self.base_url))
        except Exception as exc:  # never in the way of the command that started us
            log.warning("notification catch-up failed (%s): %s", type(exc).__name__, exc)
        return added

    # -- hooks ---------------------------------------------------------------------------------

    async def on_approval(self, event: str, appr: ApprovalRequest) -> None:
        """The gateway's ``Notifier``: ``(event, request)`` for requested/escalated/expired/decided."""
        await self.notify(approval_notification(event, appr, self.base_url))

    async def on_step_approval(self, run: RunRecord, appr: StepApproval) -> None:
        """The engine's approval hook: a workflow's approval step waits (or was escalated)."""
        await self.notify(step_approval_notification(run, appr, self.base_url))

    async def on_run_failed(self, run: RunRecord) -> None:
        """The engine's failure hook; a child run's failure is reported through its parent."""
        if run.parent_run_id is None:
            await self.notify(run_failed_notification(run, self.base_url))

    # -- delivery ------------------------------------------------------------------------------

    async def notify(self, notification: Notification) -> None:
        """Store the notification in the outbox (or, without a store, queue it in memory)."""
        if notification.event not in self.events:
            return
        if self.outbox is not None:
            try:
                await self.outbox.enqueue(notification)
                return
            except Exception as exc:  # the store is away: better an in-memory try than nothing
                log.warning("notification outbox unavailable (%s); sending from memory", type(exc).__name__)
        self.send(notification)

    def send(self, notification: Notification) -> None:
        """Queue a notification to every channel in memory (not durable); returns at once."""
        if notification.event not in self.events:
            return
        loop = asyncio.get_running_loop()
        for index, channel in enumerate(self.channels):
            # one channel delivers in order (a request before its escalation), channels in parallel
            task = loop.create_task(self._deliver(channel, notification, self._last.get(index)))
            self._last[index] = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, channel: Channel, n: Notification, after: asyncio.Task[None] | None) -> None:
        if after is not None and not after.done():
            await asyncio.wait([after])
        for attempt in range(1, self.attempts + 1):
            try:
                await channel.deliver(n)
            except DeliveryError as exc:
                last = attempt == self.attempts or not exc.retryable
                log.log(
                    logging.ERROR if last else logging.WARNING,
                    "notification %s %s via %s failed (attempt %d/%d): %s",
                    n.event,
                    n.subject_id,
                    channel.name,
                    attempt,
                    self.attempts,
                    exc,
                )
                if last:
                    self.failed.append((channel.name, n.event, n.subject_id))
                    return
            except Exception:
                log.exception("notification %s via %s: unexpected error", n.event, channel.name)
                self.failed.append((channel.name, n.event, n.subject_id))
                return
            else:
                self.delivered.append((channel.name, n.event, n.subject_id))
                return
            delay = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
            await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))

    async def flush(self, timeout: float | None = None) -> None:
        """Wait for the deliveries in flight (retries included); with an outbox, until none is pending."""
        if self._catch_up is not None:
            await asyncio.wait({self._catch_up}, timeout=timeout)
        if self.outbox is not None:
            await self.outbox.flush(timeout)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop sending; undelivered outbox rows wait for the next start (of any process)."""
        if self._catch_up is not None and not self._catch_up.done():
            self._catch_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._catch_up
        if self.outbox is not None:
            await self.outbox.stop(timeout)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for channel in self.channels:
            await channel.aclose()


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


async def waiting_approval_steps(store: SqlStore, limit: int = 1000) -> list[tuple[RunRecord, StepApproval]]:
    """Approval steps of every tenant's runs that wait for a decision, as the engine announced
    them when they started waiting (same step key and start time: the same dedupe key)."""

    def fn(conn: sa.Connection) -> list[tuple[str, str, str, float, str | None]]:
        s, r = t.steps.c, t.runs.c
        query = (
            sa.select(s.run_id, s.step_key, s.step_id, s.started_at, s.detail)
            .join(t.runs, r.id == s.run_id)
            .where(
                s.kind == "approval", s.status == "waiting", r.status.in_(("waiting", "running", "pending"))
            )
            .order_by(s.started_at)
            .limit(limit)
        )
        return [
            (row.run_id, row.step_key, row.step_id, row.started_at, row.detail) for row in conn.execute(query)
        ]

    out: list[tuple[RunRecord, StepApproval]] = []
    for run_id, step_key, step_id, started_at, raw in await store.run(fn):
        run = await store.get_run(run_id)
        if run is None:
            continue
        detail = json.loads(raw) if raw else {}
        sla = detail.get("sla")
        due = started_at + float(sla) if isinstance(sla, int | float) else None
        if detail.get("escalated"):  # announced to the new group when it escalated
            continue
        step = StepApproval(
            "requested",
            step_key,
            step_id,
            str(detail.get("title") or step_id),
            str(detail.get("prompt") or "Approve?"),
            detail.get("group"),
            due,
            started_at,
        )
        out.append((run, step))
    return out
