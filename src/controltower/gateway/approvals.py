"""Human approvals bound to the exact action.

An :class:`ApprovalRequest` carries the whole picture (proposal, reasoning, tool, exact
arguments and their digest, data read, deciding policies, cost so far, risk). A decision
is one conditional UPDATE (first decision wins), is bound to a digest, and is consumed
exactly once by the call it authorises: a replay, a retry or a crash never executes an
approved action twice, and an approval never authorises different arguments.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa

from controltower.gateway.tools import args_digest
from controltower.spec.errors import ConflictError, InvalidInputError, NotFoundError, TowerError
from controltower.spec.ids import new_id
from controltower.store import tables as t
from controltower.store.sql import SqlStore

ApprovalStatus = Literal["pending", "approved", "rejected", "expired"]
GATE_SIGNAL = "gate:"


class NotAllowedToApprove(TowerError):
    code = "forbidden"


@dataclass(frozen=True, slots=True)
class Approver:
    """Who is deciding: identity, role and groups (checked against the request's group)."""

    name: str
    role: str = "approver"  # admin | operator | approver | viewer
    groups: tuple[str, ...] = ()

    def may_decide(self, group: str | None) -> bool:
        if self.role == "admin":
            return True
        if self.role not in ("approver", "operator"):
            return False
        return group is None or group in self.groups


@dataclass(slots=True)
class ApprovalRequest:
    id: str
    tenant: str
    call_key: str
    tool: str
    tool_version: str
    args: dict[str, Any]
    digest: str
    risk: str
    status: ApprovalStatus
    approval_group: str | None
    created_at: float
    run_id: str | None = None
    step_key: str | None = None
    workflow: str | None = None
    agent: str | None = None
    context: dict[str, Any] = field(default_factory=dict)
    decided_by: str | None = None
    decided_role: str | None = None
    reason: str | None = None
    approved_args: dict[str, Any] | None = None
    approved_digest: str | None = None
    escalations: int = 0
    due_at: float | None = None
    decided_at: float | None = None
    consumed_at: float | None = None

    @property
    def edited(self) -> bool:
        return self.approved_args is not None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


# Re-validates edited arguments: schema and policy; raises a TowerError when they are not acceptable.
EditCheck = Callable[[ApprovalRequest, dict[str, Any]], Awaitable[None]]


class ApprovalBook:
    """The durable record of approval requests and decisions."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store

    async def request(
        self,
        *,
        tenant: str,
        call_key: str,
        tool: str,
        tool_version: str,
        args: dict[str, Any],
        risk: str,
        group: str | None,
        digest: str | None = None,
        run_id: str | None = None,
        step_key: str | None = None,
        workflow: str | None = None,
        agent: str | None = None,
        context: dict[str, Any] | None = None,
        due_at: float | None = None,
    ) -> tuple[ApprovalRequest, bool]:
        """The request for this call, created on first ask; ``(request, created)``.

        ``args`` is what approvers see (secrets already redacted); ``digest`` is of the real
        arguments (default: of ``args``), so the approval binds what will actually run.
        """
        now = time.time()
        row = {
            "id": new_id("apr"),
            "tenant": tenant,
            "call_key": call_key,
            "run_id": run_id,
            "step_key": step_key,
            "workflow": workflow,
            "agent": agent,
            "tool": tool,
            "tool_version": tool_version,
            "args": json.dumps(args, sort_keys=True),
            "digest": digest or args_digest(tool, tool_version, args),
            "context": json.dumps(context or {}, sort_keys=True, default=str),
            "risk": risk,
            "approval_group": group,
            "status": "pending",
            "escalations": 0,
            "due_at": due_at,
            "created_at": now,
        }

        def fn(conn: sa.Connection) -> tuple[ApprovalRequest, bool]:
            existing = conn.execute(sa.select(t.approvals).where(t.approvals.c.call_key == call_key)).first()
            if existing is not None:
                return _request(existing), False
            conn.execute(t.approvals.insert().values(**row))
            got = conn.execute(sa.select(t.approvals).where(t.approvals.c.call_key == call_key)).one()
            return _request(got), True

        try:
            return await self.store.run(fn)
        except sa.exc.IntegrityError:  # another process created it first
            found = await self.for_call(call_key)
            assert found is not None
            return found, False

    async def for_call(self, call_key: str) -> ApprovalRequest | None:
        def fn(conn: sa.Connection) -> ApprovalRequest | None:
            row = conn.execute(sa.select(t.approvals).where(t.approvals.c.call_key == call_key)).first()
            return None if row is None else _request(row)

        return await self.store.run(fn)

    async def get(self, approval_id: str, *, tenant: str | None = None) -> ApprovalRequest:
        def fn(conn: sa.Connection) -> ApprovalRequest | None:
            query = sa.select(t.approvals).where(t.approvals.c.id == approval_id)
            if tenant is not None:
                query = query.where(t.approvals.c.tenant == tenant)
            row = conn.execute(query).first()
            return None if row is None else _request(row)

        found = await self.store.run(fn)
        if found is None:
            raise NotFoundError(
                f"no approval {approval_id!r}", hint="list pending ones with: tower approvals"
            )
        return found

    async def list(
        self,
        *,
        tenant: str | None = None,
        status: Sequence[str] | None = ("pending",),
        run_id: str | None = None,
        group: str | None = None,
        limit: int = 100,
    ) -> list[ApprovalRequest]:
        def fn(conn: sa.Connection) -> list[ApprovalRequest]:
            query = sa.select(t.approvals)
            if tenant is not None:
                query = query.where(t.approvals.c.tenant == tenant)
            if status:
                query = query.where(t.approvals.c.status.in_(list(status)))
            if run_id is not None:
                query = query.where(t.approvals.c.run_id == run_id)
            if group is not None:
                query = query.where(t.approvals.c.approval_group == group)
            query = query.order_by(t.approvals.c.created_at).limit(limit)
            return [_request(r) for r in conn.execute(query)]

        return await self.store.run(fn)

    async def decide(
        self,
        approval_id: str,
        *,
        approver: Approver,
        approve: bool,
        reason: str | None = None,
        edited_args: dict[str, Any] | None = None,
        check_edit: EditCheck | None = None,
        tenant: str | None = None,
    ) -> ApprovalRequest:
        """Approve (optionally with edited arguments) or reject; the first decision wins."""
        req = await self.get(approval_id, tenant=tenant)
        if not approver.may_decide(req.approval_group):
            need = f"group {req.approval_group!r}" if req.approval_group else "the approver role"
            raise NotAllowedToApprove(
                f"{approver.name} ({approver.role}) may not decide approval {approval_id}: it needs {need}"
            )
        if req.status != "pending":
            raise ConflictError(f"approval {approval_id} is already {req.status}")
        if not approve and not (reason or "").strip():
            raise InvalidInputError("a rejection needs a reason", hint="pass --reason 'why'")
        # approved as asked: bound to the request's digest, the caller's own arguments run;
        # edited: the approver's arguments run, bound to their new digest
        digest: str | None = None
        if approve:
            digest = req.digest
            if edited_args is not None:
                if check_edit is not None:
                    await check_edit(req, edited_args)
                digest = args_digest(req.tool, req.tool_version, edited_args)
        now = time.time()
        values = {
            "status": "approved" if approve else "rejected",
            "decided_by": approver.name,
            "decided_role": approver.role,
            "reason": reason,
            "approved_args": json.dumps(edited_args, sort_keys=True) if approve and edited_args else None,
            "approved_digest": digest,
            "decided_at": now,
        }
        signal_payload = {"approval_id": approval_id, "approved": approve, "by": approver.name}

        def fn(conn: sa.Connection) -> bool:
            done = conn.execute(
                t.approvals.update()
                .where(t.approvals.c.id == approval_id, t.approvals.c.status == "pending")
                .values(**values)
            ).rowcount
            if done != 1:
                return False
            if req.run_id is not None:  # wake the parked run, in the same transaction
                self.store.signal_in(conn, req.run_id, GATE_SIGNAL + req.call_key, signal_payload, now)
            return True

        if not await self.store.run(fn):
            current = await self.get(approval_id)
            raise ConflictError(f"approval {approval_id} is already {current.status}")
        return await self.get(approval_id)

    async def consume(self, call_key: str, digest: str) -> bool:
        """Mark the approval of ``call_key`` used by an execution of exactly ``digest``; once."""

        return await self.store.run(lambda conn: self.consume_in(conn, call_key, digest))

    @staticmethod
    def consume_in(conn: sa.Connection, call_key: str, digest: str) -> bool:
        """:meth:`consume` inside the caller's transaction (the call's claim)."""
        done = conn.execute(
            t.approvals.update()
            .where(
                t.approvals.c.call_key == call_key,
                t.approvals.c.status == "approved",
                t.approvals.c.approved_digest == digest,
                t.approvals.c.consumed_at.is_(None),
            )
            .values(consumed_at=time.time())
        ).rowcount
        return bool(done == 1)

    async def escalate(self, approval_id: str, *, to_group: str, due_at: float | None) -> ApprovalRequest:
        def fn(conn: sa.Connection) -> int:
            return int(
                conn.execute(
                    t.approvals.update()
                    .where(t.approvals.c.id == approval_id, t.approvals.c.status == "pending")
                    .values(
                        approval_group=to_group,
                        due_at=due_at,
                        escalations=t.approvals.c.escalations + 1,
                    )
                ).rowcount
            )

        await self.store.run(fn)
        return await self.get(approval_id)

    async def expire(self, approval_id: str, reason: str) -> ApprovalRequest:
        def fn(conn: sa.Connection) -> int:
            return int(
                conn.execute(
                    t.approvals.update()
                    .where(t.approvals.c.id == approval_id, t.approvals.c.status == "pending")
                    .values(status="expired", reason=reason, decided_at=time.time(), decided_by="sla")
                ).rowcount
            )

        await self.store.run(fn)
        return await self.get(approval_id)


def _request(row: sa.Row[Any]) -> ApprovalRequest:
    m = row._mapping
    return ApprovalRequest(
        id=m["id"],
        tenant=m["tenant"],
        call_key=m["call_key"],
        tool=m["tool"],
        tool_version=m["tool_version"],
        args=json.loads(m["args"]),
        digest=m["digest"],
        risk=m["risk"],
        status=m["status"],
        approval_group=m["approval_group"],
        created_at=m["created_at"],
        run_id=m["run_id"],
        step_key=m["step_key"],
        workflow=m["workflow"],
        agent=m["agent"],
        context=json.loads(m["context"]) if m["context"] else {},
        decided_by=m["decided_by"],
        decided_role=m["decided_role"],
        reason=m["reason"],
        approved_args=json.loads(m["approved_args"]) if m["approved_args"] else None,
        approved_digest=m["approved_digest"],
        escalations=m["escalations"],
        due_at=m["due_at"],
        decided_at=m["decided_at"],
        consumed_at=m["consumed_at"],
    )
