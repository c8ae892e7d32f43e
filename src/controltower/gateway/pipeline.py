"""The pipeline every tool call passes, in this order; each stage can stop it with a reason.

kill switch → resolve → validate arguments → (recorded result?) → policy (Cedar) →
autonomy → budget reservation → approval → rate limit / concurrency slot → idempotent
claim → execute with scoped credentials → validate output → record, audit, trace, metrics.

The policy decision (CPU only) is computed before the store is touched, so that the
recorded-result lookup, the reservation and a write's claim share one transaction; a recorded
result still wins over the decision. The result, its charge and its audit record share the
second. See bench/README.md ("Gateway overhead") for what each costs.

A stop at any stage is a :class:`ToolResult` with a stable ``code`` and a ``reason``,
recorded in the audit trail — never an exception the agent has to survive. Errors of the
gateway itself (a broken store) do propagate: they are not the agent's to handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema
import sqlalchemy as sa
from opentelemetry import trace

from controltower.gateway.allotments import Allotments, Draw
from controltower.gateway.approvals import ApprovalBook, ApprovalRequest, Approver
from controltower.gateway.audit import AuditEvent, AuditLog
from controltower.gateway.autonomy import AutonomySettings, tighten
from controltower.gateway.budgets import BudgetExceeded, BudgetLedger, Reservation
from controltower.gateway.calls import CallLog, CallRecord, CallRecordRow, Claim
from controltower.gateway.metrics import GatewayMetrics
from controltower.gateway.monitor import Controls
from controltower.gateway.policy import (
    PolicyDecision,
    PolicyEngine,
    PolicyError,
    PolicyRequest,
    read_policy_dir,
)
from controltower.gateway.ratelimit import RateLimited, RateLimiter, run_retrying
from controltower.gateway.registry import ToolRegistry, ToolUnavailableError, UnknownToolError
from controltower.gateway.secrets import Redactor, SecretScope
from controltower.gateway.tools import ExecContext, Executor, ToolDefinition, args_digest
from controltower.spec.errors import ConflictError, InvalidInputError, NotFoundError, TowerError
from controltower.store.sql import SqlStore, dumps

_tracer = trace.get_tracer("controltower.gateway")
ResultStatus = Literal["ok", "denied", "pending_approval", "drafted", "error"]
Notifier = Callable[[str, ApprovalRequest], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ApprovalSettings:
    sla: float | None = None
    on_timeout: Literal["escalate", "fail"] = "fail"
    escalate_to: str | None = None
    group: str | None = None  # decides approvals that carry no group of their own (autonomy)


@dataclass(frozen=True, slots=True)
class ToolCallRequest:
    """One call as the agent (or a workflow step) asks for it. Add fields; never reorder."""

    tool: str
    args: dict[str, Any]
    tenant: str = "default"
    version: str | None = None
    workflow: str | None = None
    agent: str | None = None
    department: str | None = None
    run_id: str | None = None
    step_key: str | None = None
    call_index: int = 0
    idempotency_key: str | None = None
    autonomy: str = "approve_writes"
    agent_autonomy: str | None = None
    risk_threshold: str = "low"
    approval: ApprovalSettings = field(default_factory=ApprovalSettings)
    proposal: dict[str, Any] | None = None  # reasoning, data read: shown to approvers
    timeout: float | None = None

    @property
    def call_key(self) -> str:
        if self.idempotency_key is not None:
            return f"{self.tenant}/key/{self.idempotency_key}"
        return f"{self.tenant}/{self.run_id}/{self.step_key}/{self.call_index}"

    @property
    def actor(self) -> str:
        if self.agent:
            return f"agent:{self.agent}"
        return f"workflow:{self.workflow}" if self.workflow else "api"


@dataclass(frozen=True, slots=True)
class ToolResult:
    status: ResultStatus
    tool: str
    version: str | None = None
    output: Any = None
    code: str | None = None
    reason: str | None = None
    policy_ids: tuple[str, ...] = ()
    approval_id: str | None = None
    approval_due: float | None = None
    replayed: bool = False
    retryable: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def for_agent(self) -> dict[str, Any]:
        """What a model sees: the outcome and why, never credentials or internals."""
        out: dict[str, Any] = {"status": self.status, "tool": self.tool}
        if self.ok:
            out["output"] = self.output
        else:
            out.update(code=self.code, reason=self.reason)
        return out


class ToolGateway:
    def __init__(
        self,
        store: SqlStore,
        registry: ToolRegistry,
        policy: PolicyEngine | Mapping[str, str],
        *,
        env: str = "dev",
        redactor: Redactor | None = None,
        audit: AuditLog | None = None,
        budgets: BudgetLedger | None = None,
        limiter: RateLimiter | None = None,
        controls: Controls | None = None,
        notifier: Notifier | None = None,
        metrics: GatewayMetrics | None = None,
        rate_wait: float = 5.0,
        allotments: Allotments | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        # policies are checked against the registry's tools, so texts are compiled on first use
        self.policy: PolicyEngine | None = policy if isinstance(policy, PolicyEngine) else None
        self.policy_texts: dict[str, str] = (
            dict(policy.texts) if isinstance(policy, PolicyEngine) else dict(policy)
        )
        self.env = env
        self.redactor = redactor or Redactor()
        self.audit = audit or AuditLog(store, redactor=self.redactor)
        self.budgets = budgets or BudgetLedger(store)
        # priced calls allowed outright take their price from an allotment (see allotments.py)
        self.allotments = allotments or Allotments(self.budgets)
        self.limiter = limiter or RateLimiter(store)
        self.controls = controls or Controls(store, audit=self.audit)
        self.autonomy = AutonomySettings(self.controls)
        self.approvals = ApprovalBook(store)
        self.calls = CallLog(store)
        self.notifier = notifier
        self.metrics = metrics or GatewayMetrics()
        self.rate_wait = rate_wait
        self._validators: dict[tuple[str, str, str], Any] = {}
        self._policy_lock = asyncio.Lock()
        # True under the engine: a read's record rides on the next commit (see _execute)
        self.defer_read_records = False
        self._deferred: set[asyncio.Future[None]] = set()
        # at most this many deferred records waiting: a caller that outruns the store (sequential
        # calls of a tool that never blocks) then waits for it instead of growing the queue
        # without end. Large on purpose: a small bound makes every n-th call wait for a whole
        # batch (32: 4-6 ms every ~30 calls in bench/gateway.py); this one bounds memory.
        self.max_deferred = 1024

    # -- the pipeline ------------------------------------------------------------------

    async def call(self, req: ToolCallRequest) -> ToolResult:
        started = time.perf_counter()
        # GenAI semantic conventions: one execute_tool span per call; never arguments or outputs
        with _tracer.start_as_current_span(f"execute_tool {req.tool}") as span:
            span.set_attribute("gen_ai.operation.name", "execute_tool")
            span.set_attribute("gen_ai.tool.name", req.tool)
            span.set_attribute("controltower.tenant", req.tenant)
            if req.workflow:
                span.set_attribute("controltower.workflow", req.workflow)
            if req.agent:
                span.set_attribute("gen_ai.agent.name", req.agent)
            if req.run_id:
                span.set_attribute("controltower.run_id", req.run_id)
            result = await self._call(req)
            span.set_attribute("controltower.outcome", result.status)
            if result.code:
                span.set_attribute("controltower.code", result.code)
            if result.status == "error":
                span.set_status(trace.Status(trace.StatusCode.ERROR, result.code or "error"))
        self.metrics.observe(req.tool, result.status, result.code, time.perf_counter() - started)
        return result

    async def _call(self, req: ToolCallRequest) -> ToolResult:
        if req.workflow:
            paused = await self.controls.is_paused(req.tenant, req.workflow)
            if paused is not None:
                return await self._stop(req, None, "paused", f"workflow {req.workflow} is paused: {paused}")
        try:
            tool = await self.registry.resolve(req.tool, req.version, tenant=req.tenant)
        except UnknownToolError as exc:
            return await self._stop(req, None, "unknown_tool", str(exc))
        problems = self._check(tool, "input", req.args)
        if problems:
            return await self._stop(req, tool, "invalid_args", problems)
        digest = args_digest(tool.name, tool.version, req.args)

        # The policy decision is CPU only, so it is made first (a recorded result still wins
        # over it below): the recorded-result lookup, the budget reservation and the claim of a
        # write then share ONE store transaction.
        cost_cents = 0
        if req.run_id and self._policies_use_cost():  # a store read only when a policy looks at cost
            cost_cents = await self._run_cost_cents(req)
        policy = await self.policy_for(tool, req.tenant)
        decision: PolicyDecision | None = None
        effect: str = "deny"
        why: str | None = None
        if not isinstance(policy, PolicyError):
            decision = policy.decide(
                PolicyRequest(
                    tool=tool,
                    agent=req.agent,
                    workflow=req.workflow,
                    department=req.department,
                    tenant=req.tenant,
                    env=self.env,
                    args=req.args,
                    cost_so_far_cents=cost_cents,
                    run_cost_cents=cost_cents,
                )
            )
            level = await self.autonomy.effective(
                req.tenant, req.workflow, req.agent, req.autonomy, req.agent_autonomy
            )
            effect, why = tighten(decision.effect, tool, level, risk_threshold=req.risk_threshold)
        # a write allowed outright is claimed in the same transaction, unless something that may
        # stop it (a rate limit, a missing executor) comes between the claim and the run
        executor: Executor | ToolUnavailableError | None = None
        if (
            effect == "allow"
            and tool.writes
            and (tool.rate_limit is None or tool.rate_limit.per_second is None)
        ):
            try:
                executor = self.registry.executor(tool, tenant=req.tenant)
            except ToolUnavailableError as exc:
                executor = exc
        draw: Draw | None = None
        if tool.cost_micros and effect == "allow" and not self._policies_use_cost():
            scopes = self.budgets.check_reservation(
                req.call_key, req.tenant, self._scopes(req), "micros", tool.cost_micros
            )
            draw = self.allotments.take(req.tenant, scopes, tool.cost_micros)
        try:
            return await self._go(
                req, tool, digest, policy, decision, effect, why, cost_cents, executor, draw
            )
        finally:
            if draw is not None:
                self.allotments.settle(draw)

    async def _go(
        self,
        req: ToolCallRequest,
        tool: ToolDefinition,
        digest: str,
        policy: PolicyEngine | PolicyError,
        decision: PolicyDecision | None,
        effect: str,
        why: str | None,
        cost_cents: int,
        executor: Executor | ToolUnavailableError | None,
        draw: Draw | None,
    ) -> ToolResult:
        fold_claim = executor is not None and not isinstance(executor, ToolUnavailableError)
        go = effect in ("allow", "require_approval")
        allotments = self.allotments
        returned = allotments.returned
        prior, reserved, claim = await self._begin(req, tool, digest, go, fold_claim, draw)
        for _ in range(3):  # refused by a cap: the missing money may be set aside in this gateway
            if not isinstance(reserved, BudgetExceeded):
                break
            if allotments.holds(req.tenant):
                await allotments.reclaim(req.tenant)
            await allotments.drain()
            if allotments.returned == returned:  # nothing given back since the attempt began
                break
            returned = allotments.returned
            prior, reserved, claim = await self._begin(req, tool, digest, go, fold_claim, draw)
        if prior is not None and prior.status == "completed":
            if prior.args_digest != digest:
                return await self._stop(
                    req, tool, "idempotency_conflict", "this call key already ran with different arguments"
                )
            return ToolResult("ok", tool.name, tool.version, output=prior.result, replayed=True)

        if isinstance(policy, PolicyError):
            return await self._stop(req, tool, "policy_invalid", f"the policies do not load: {policy}")
        assert decision is not None
        ids = tuple(decision.policy_ids)
        if effect == "deny":
            code = "policy_denied" if ids else "no_grant"
            return await self._stop(req, tool, code, why or decision.reason, ids)
        if effect == "draft":
            await self._audit(
                req, tool, "proposal", "drafted", why, digest, {"args": req.args, "policies": ids}
            )
            return ToolResult(
                "drafted", tool.name, tool.version, code="draft_only", reason=why, policy_ids=ids
            )
        if isinstance(reserved, BudgetExceeded):
            return await self._stop(req, tool, "budget_exceeded", str(reserved), ids)

        exec_args, exec_digest, approval = req.args, digest, None
        if effect == "require_approval":
            group = decision.approval_group or req.approval.group
            outcome = await self._approval(req, tool, digest, group, ids, why or decision.reason, cost_cents)
            if isinstance(outcome, ToolResult):
                return outcome
            approval = outcome
            assert approval.approved_digest is not None
            exec_digest = approval.approved_digest
            if approval.approved_args is not None:  # the approver edited them
                exec_args = approval.approved_args

        return await self._execute(
            req,
            tool,
            exec_args,
            digest,
            exec_digest,
            approval,
            ids,
            executor=executor,
            claim=claim,
            draw=draw,
        )

    async def _begin(
        self,
        req: ToolCallRequest,
        tool: ToolDefinition,
        digest: str,
        go: bool,
        claim: bool,
        draw: Draw | None = None,
    ) -> tuple[CallRecord | None, Reservation | BudgetExceeded | None, Claim | None]:
        """One transaction: the recorded result; if none and ``go``, the budget reservation (or a
        new allotment for ``draw``) and, with ``claim``, the idempotent claim. Without writes it
        commits nothing (no fsync); a call whose price came from an allotment may need none."""
        key, cost = req.call_key, tool.cost_micros
        reserve = 0 if draw is not None and draw.allotment is not None else cost  # what to reserve now
        scopes: list[str] = []
        if reserve and go:  # a bad key or scope fails here, as reserving did, only for a call that may go
            scopes = self.budgets.check_reservation(key, req.tenant, self._scopes(req), "micros", cost)
        allotments = self.allotments
        grant = allotments.grant_size(draw) if draw is not None and reserve and go else 0
        grant_key = allotments.new_key() if grant else ""
        sweep = bool(grant) and allotments.sweep_due()
        call = CallRecordRow(key, req.tenant, tool.name, tool.version, digest, req.run_id, req.step_key)
        retry_in_doubt = not tool.writes or "idempotent" in tool.tags
        budgets = self.budgets
        # A recorded result, or a call that needs neither a reservation nor a claim, may not need
        # the store thread at all (SQLite: read on this thread; "completed" is final).
        found = self.calls.get_now(key)
        if found is not None:
            prior = found[0]
            if prior is not None and prior.status == "completed":
                if not cost or prior.args_digest != digest or budgets.settled_now(key):
                    return prior, None, None
            elif not claim and (not go or not reserve):
                return prior, None, None

        def job(conn: Any) -> tuple[CallRecord | None, Reservation | BudgetExceeded | None, Claim | None]:
            if cost:  # lock order on PostgreSQL: the tenant's budgets, then the call's row
                budgets.lock_in(conn, req.tenant)
            prior = CallLog.get_in(conn, key, lock=claim)
            if prior is not None and prior.status == "completed":
                if cost and prior.args_digest == digest:  # settles a charge a crash may have interrupted
                    budgets.commit_in(conn, key, cost)
                return prior, None, None
            if not go:
                return prior, None, None
            reserved: Reservation | BudgetExceeded | None = None
            if grant:  # an allotment instead of this call's own reservation, far enough from every cap
                reserved = allotments.grant_in(conn, grant_key, req.tenant, scopes, cost, grant, sweep)
            if reserved is None and reserve:
                reserved = budgets.reserve_in(conn, key, req.tenant, scopes, "micros", reserve)
            if isinstance(reserved, BudgetExceeded) or not claim:
                return prior, reserved, None
            return prior, reserved, CallLog.claim_in(conn, call, retry_in_doubt=retry_in_doubt, prior=prior)

        # Durability of this commit: it must be VISIBLE before the tool runs (other processes see
        # the reservation: caps stay exact; a concurrent claim sees this one), but for a call that
        # is safe to run again (a read, or a tool tagged idempotent) it need not be on disk yet:
        # the result's commit after the call is durable and, the log being sequential, takes this
        # one to disk with it; an OS crash before that loses both, and the replay runs the call
        # again and reserves again. A write's claim stays durable: it is what marks an
        # interrupted write "in doubt" so that it is never run twice. (A transaction that may
        # write no reservation stays "durable": it writes nothing to wait for anyway, and on
        # PostgreSQL relaxing it would cost a statement.)
        relaxed = bool(reserve) and go and not (claim and not retry_in_doubt)
        try:
            out = await run_retrying(self.store, job, durable=not relaxed)
        except sa.exc.IntegrityError:  # a concurrent claim of the same key won (nothing was kept)
            return None, None, Claim("in_doubt", await self.calls.get(key))
        if grant and draw is not None:
            got = out[1]
            if isinstance(got, Reservation) and got.key == grant_key:
                allotments.granted_to(draw, grant_key, got.amount)
            else:
                allotments.granted_to(draw, None, 0)
        return out

    async def _execute(
        self,
        req: ToolCallRequest,
        tool: ToolDefinition,
        args: dict[str, Any],
        digest: str,
        exec_digest: str,
        approval: ApprovalRequest | None,
        ids: tuple[str, ...],
        *,
        executor: Executor | ToolUnavailableError | None = None,
        claim: Claim | None = None,
        draw: Draw | None = None,
    ) -> ToolResult:
        try:
            if tool.rate_limit is not None and tool.rate_limit.per_second is not None:
                await self.limiter.acquire(
                    f"{req.tenant}/{tool.name}", tool.rate_limit, wait=True, timeout=self.rate_wait
                )
        except RateLimited as exc:
            await self._release(req, tool, draw)
            return await self._stop(req, tool, "rate_limited", str(exc), ids, retryable=True)

        if executor is None:
            try:
                executor = self.registry.executor(tool, tenant=req.tenant)
            except ToolUnavailableError as exc:
                executor = exc
        if isinstance(executor, ToolUnavailableError):
            await self._release(req, tool, draw)
            return await self._stop(req, tool, "tool_unavailable", str(executor), ids)
        retry_in_doubt = not tool.writes or "idempotent" in tool.tags
        # A read needs no "started" mark: running it again is harmless, so its only write is
        # the result with its audit record (one commit). Writes are claimed before they run
        # (in the transaction of the reservation when nothing can stop them in between).
        claimed = tool.writes or approval is not None
        if claim is None and not claimed:
            claim = Claim("claimed")
        if claim is None:
            claim = await self.calls.claim(
                req.call_key,
                tenant=req.tenant,
                tool=tool.name,
                version=tool.version,
                digest=digest,
                run_id=req.run_id,
                step_key=req.step_key,
                retry_in_doubt=retry_in_doubt,
                approval=(req.call_key, exec_digest) if approval is not None else None,
            )
        if claim.outcome == "completed":
            assert claim.record is not None
            return ToolResult("ok", tool.name, tool.version, output=claim.record.result, replayed=True)
        if claim.outcome == "in_doubt":
            return await self._stop(
                req,
                tool,
                "in_doubt",
                f"an earlier attempt of this {tool.side_effect} call started but never reported, so it "
                f"is not run again automatically; find out what happened, then settle it with: "
                f"tower reconcile {req.call_key} --result JSON (or --failed), and resume the run",
                ids,
            )
        if claim.outcome == "approval_used":
            return await self._stop(req, tool, "approval_used", "this approval was already used", ids)
        if claim.outcome == "digest_mismatch":
            return await self._stop(req, tool, "idempotency_conflict", "call key reused with other arguments")

        slot: contextlib.AbstractAsyncContextManager[Any] = contextlib.nullcontext()
        if tool.rate_limit is not None and tool.rate_limit.concurrency:
            slot = self.limiter.slot(
                f"{req.tenant}/{tool.name}", tool.rate_limit.concurrency, req.call_key, lease=60.0
            )
        credentials = SecretScope(tool, self.env, self.redactor).resolve()
        ctx = ExecContext(
            tool=tool,
            env=self.env,
            idempotency_key=req.call_key,
            credentials=credentials,
            timeout=req.timeout,
            run_id=req.run_id,
            step_key=req.step_key,
            tenant=req.tenant,
        )
        try:
            async with slot:
                if req.timeout is not None:
                    output = await asyncio.wait_for(executor(args, ctx), req.timeout)
                else:
                    output = await executor(args, ctx)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            retryable = bool(getattr(exc, "retryable", False)) or isinstance(exc, TimeoutError)
            message = self.redactor.redact_text(f"{type(exc).__name__}: {exc}")
            code = exc.code if isinstance(exc, TowerError) else "tool_error"
            await self.calls.fail(req.call_key, {"code": code, "message": message, "retryable": retryable})
            await self._release(req, tool, draw)
            await self._audit(req, tool, "tool_call", "failed", message, digest, {"code": code})
            return ToolResult(
                "error",
                tool.name,
                tool.version,
                code=code,
                reason=message,
                policy_ids=ids,
                retryable=retryable,
            )
        problems = self._check(tool, "output", output)
        if problems:
            await self.calls.fail(req.call_key, {"code": "invalid_output", "message": problems})
            await self._release(req, tool, draw)
            await self._audit(req, tool, "tool_call", "invalid_output", problems, digest, {})
            return ToolResult("error", tool.name, tool.version, code="invalid_output", reason=problems)
        data = {
            "side_effect": tool.side_effect,
            "risk": tool.risk,
            "version": tool.version,
            "cost_micros": tool.cost_micros,
            "policies": list(ids),
            "approval_id": approval.id if approval else None,
            "edited": bool(approval and approval.edited),
        }
        # the result and its audit record commit together: a crash cannot leave an executed
        # call unaudited (and a replay finds the result, so it never runs again)
        event = self._event(req, tool, "tool_call", "executed", None, exec_digest, data)
        rows = self.audit.prepare([event])  # redaction, JSON and hash input off the store thread
        text = dumps(output)
        call = CallRecordRow(
            req.call_key, req.tenant, tool.name, tool.version, digest, req.run_id, req.step_key
        )
        complete_in, commit_in, draw_in, append_in = (
            self.calls.complete_in,
            self.budgets.commit_in,
            self.budgets.draw_in,
            self.audit.append_prepared_in,
        )
        key, cost = req.call_key, tool.cost_micros
        allotment = draw.allotment.key if draw is not None and draw.allotment is not None else None
        scopes = draw.scopes if draw is not None else []

        lock_in, tenant = self.budgets.lock_in, req.tenant

        def record(conn: Any) -> Any:
            # one transaction: the result, the charge and the audit record; locks in the order
            # every gateway transaction takes them: budgets, the call's row, the audit chain
            if cost:
                lock_in(conn, tenant)
            complete_in(conn, call, output, text=text)
            if cost and allotment is not None:
                draw_in(conn, allotment, key, tenant, scopes, cost)
            elif cost:
                commit_in(conn, key, cost)
            return append_in(conn, rows)

        deferred = self.defer_read_records and not tool.writes
        # a deferred record need not wait for the disk either: the caller's next commit (the
        # engine's step record) is durable and, committed after it, takes it to disk with it
        pending = self.store.run_soon(record, durable=not deferred)  # queued now: before the
        if draw is not None:  # allotment can be given back (that is queued after it)
            draw.charged = True
        if deferred:
            # The store commits jobs in order, so this record (and a priced read's charge) is
            # durable no later than anything the caller commits after using the result (the
            # engine's step record): a crash cannot keep a step that used an unaudited read; the
            # reservation made before the call keeps the caps exact meanwhile. Writes always wait.
            task = asyncio.ensure_future(self._publish_later(pending))
            self._deferred.add(task)
            task.add_done_callback(self._deferred.discard)
            if len(self._deferred) > self.max_deferred:  # backpressure: a bounded backlog
                await asyncio.wait(list(self._deferred), return_when=asyncio.FIRST_COMPLETED)
        else:
            await self.audit.publish(await pending)
        return ToolResult("ok", tool.name, tool.version, output=output, policy_ids=ids)

    async def _publish_later(self, pending: Awaitable[Any]) -> None:
        try:
            await self.audit.publish(await pending)
        except Exception:
            logging.getLogger("controltower.gateway").exception("recording a read tool call failed")

    async def flush(self) -> None:
        """Wait until deferred read records are committed (call before closing the store)."""
        while self._deferred:
            await asyncio.gather(*list(self._deferred), return_exceptions=True)
        await self.allotments.aclose()

    async def reconcile(self, call_key: str, *, by: str, result: Any = None, failed: bool = False) -> None:
        """Settle an in-doubt call with what really happened; audited like any decision."""
        record = await self.calls.get(call_key)
        if record is None:
            raise NotFoundError(f"no tool call {call_key!r}", hint="the key is in the step's error")
        if record.status != "started":
            raise ConflictError(f"call {call_key} is {record.status}, not in doubt")
        await self.calls.resolve_in_doubt(call_key, result=result, failed=failed)
        tenant = call_key.split("/", 1)[0]
        event = AuditEvent(
            tenant=tenant,
            actor=f"user:{by}",
            kind="reconcile",
            outcome="failed" if failed else "completed",
            subject=record.tool,
            reason="an operator settled an in-doubt call",
            inputs_digest=record.args_digest,
            data={"call_key": call_key, "result": result},
        )
        await self.audit.append(event)

    # -- approvals -------------------------------------------------------------------------

    async def decide(
        self,
        approval_id: str,
        *,
        approver: Approver,
        approve: bool,
        reason: str | None = None,
        edited_args: dict[str, Any] | None = None,
        tenant: str | None = None,
    ) -> ApprovalRequest:
        """Decide an approval; edited arguments are re-validated and re-checked by policy first."""

        async def check_edit(request: ApprovalRequest, args: dict[str, Any]) -> None:
            tool = await self.registry.resolve(request.tool, request.tool_version, tenant=request.tenant)
            problems = self._check(tool, "input", args)
            if problems:
                raise InvalidInputError(problems, hint="edit the arguments to match the tool's input schema")
            policy = await self.policy_for(tool, request.tenant)
            if isinstance(policy, PolicyError):
                raise policy
            decision = policy.decide(
                PolicyRequest(
                    tool=tool,
                    agent=request.agent,
                    workflow=request.workflow,
                    department=None,
                    tenant=request.tenant,
                    env=self.env,
                    args=args,
                )
            )
            if decision.effect == "deny":
                raise InvalidInputError(
                    f"policy denies the edited arguments: {decision.reason}",
                    hint="an approval can only authorise what policy allows",
                )

        decided = await self.approvals.decide(
            approval_id,
            approver=approver,
            approve=approve,
            reason=reason,
            edited_args=edited_args,
            check_edit=check_edit,
            tenant=tenant,
        )
        outcome = "approved" if approve else "rejected"
        if decided.edited:
            outcome = "approved_edited"
        event = AuditEvent(
            tenant=decided.tenant,
            actor=f"user:{approver.name}",
            kind="approval",
            outcome=outcome,
            subject=decided.tool,
            run_id=decided.run_id,
            workflow=decided.workflow,
            reason=reason,
            inputs_digest=decided.approved_digest or decided.digest,
            data={"approval_id": decided.id, "role": approver.role, "edited": decided.edited},
        )
        await self.audit.append(event)
        await self._notify("decided", decided)
        return decided

    async def _approval(
        self,
        req: ToolCallRequest,
        tool: ToolDefinition,
        digest: str,
        group: str | None,
        ids: tuple[str, ...],
        why: str | None,
        cost_cents: int,
    ) -> ApprovalRequest | ToolResult:
        now = time.time()
        context = {
            "proposal": req.proposal or {},
            "policies": list(ids),
            "why": why,
            "cost_so_far_cents": cost_cents,
            "side_effect": tool.side_effect,
            "env": self.env,
        }
        due = now + req.approval.sla if req.approval.sla else None
        appr, created = await self.approvals.request(
            tenant=req.tenant,
            call_key=req.call_key,
            tool=tool.name,
            tool_version=tool.version,
            args=self.redactor.redact(req.args),
            digest=digest,
            risk=tool.risk,
            group=group,
            run_id=req.run_id,
            step_key=req.step_key,
            workflow=req.workflow,
            agent=req.agent,
            context=self.redactor.redact(context),
            due_at=due,
        )
        if created:
            await self._audit(
                req, tool, "approval", "requested", why, digest, {"approval_id": appr.id, "group": group}
            )
            await self._notify("requested", appr)
        if appr.digest != digest:
            return await self._stop(
                req, tool, "approval_mismatch", "the arguments differ from the ones sent for approval", ids
            )
        if appr.status == "pending" and appr.due_at is not None and now >= appr.due_at:
            appr = await self._sla_expired(req, tool, appr)
        if appr.status == "pending":
            return ToolResult(
                "pending_approval",
                tool.name,
                tool.version,
                code="approval_required",
                reason=why,
                policy_ids=ids,
                approval_id=appr.id,
                approval_due=appr.due_at,
            )
        if appr.status != "approved":
            await self._release(req, tool)
            reason = f"{appr.status} by {appr.decided_by}: {appr.reason or 'no reason given'}"
            return await self._stop(req, tool, appr.status, reason, ids, audit=False)
        return appr

    async def _sla_expired(
        self, req: ToolCallRequest, tool: ToolDefinition, appr: ApprovalRequest
    ) -> ApprovalRequest:
        settings = req.approval
        if settings.on_timeout == "escalate" and settings.escalate_to and appr.escalations == 0:
            due = time.time() + settings.sla if settings.sla else None
            appr = await self.approvals.escalate(appr.id, to_group=settings.escalate_to, due_at=due)
            await self._audit(
                req,
                tool,
                "approval",
                "escalated",
                f"SLA passed; now {settings.escalate_to}",
                appr.digest,
                {"approval_id": appr.id},
            )
            await self._notify("escalated", appr)
            return appr
        appr = await self.approvals.expire(appr.id, "no decision within the SLA")
        await self._audit(
            req,
            tool,
            "approval",
            "expired",
            "no decision within the SLA",
            appr.digest,
            {"approval_id": appr.id},
        )
        await self._notify("expired", appr)
        return appr

    async def _notify(self, event: str, appr: ApprovalRequest) -> None:
        if self.notifier is None:
            return
        try:
            await self.notifier(event, appr)
        except Exception as exc:  # a broken notifier must not block the action or lose the request
            import logging

            logging.getLogger("controltower.gateway").warning("approval notifier failed: %s", exc)

    # -- helpers ---------------------------------------------------------------------------

    async def policy_for(self, tool: ToolDefinition, tenant: str) -> PolicyEngine | PolicyError:
        """The policy engine with ``tool`` in its schema; rebuilt when the registry grew."""
        if self.policy is not None and self.policy.knows(tool):
            return self.policy
        async with self._policy_lock:  # concurrent first calls build it once, not once each
            if self.policy is not None and self.policy.knows(tool):
                return self.policy
            tools = {t.name: t for t in self.policy.tools} if self.policy is not None else {}
            tools.update({t.name: t for t in await self.registry.latest(tenant=tenant)})
            tools[tool.name] = tool
            try:
                self.policy = PolicyEngine(self.policy_texts, tools.values())
            except PolicyError as exc:
                return exc
            return self.policy

    def _policies_use_cost(self) -> bool:
        return any("cost_cents" in text for text in self.policy_texts.values())

    def reload_policies(self, texts: Mapping[str, str]) -> None:
        """Swap the policy set (validated against the tools on the next call)."""
        self.policy_texts = dict(texts)
        self.policy = None

    def _check(self, tool: ToolDefinition, which: str, value: Any) -> str | None:
        schema = tool.input_schema if which == "input" else tool.output_schema
        if schema is None:
            return None
        key = (tool.name, tool.version, which)
        validator = self._validators.get(key)
        if validator is None:
            cls = jsonschema.validators.validator_for(schema)
            validator = self._validators[key] = cls(schema)
        errors = sorted(validator.iter_errors(value), key=lambda e: list(e.path))
        if not errors:
            return None
        parts = []
        for err in errors[:5]:
            where = "/".join(str(p) for p in err.path) or "<root>"
            parts.append(f"{where}: {err.message}")
        return f"{which} of {tool.name} does not match its schema: " + "; ".join(parts)

    def _scopes(self, req: ToolCallRequest) -> list[str]:
        scopes = [f"tenant:{req.tenant}"]
        if req.department:
            scopes.append(f"department:{req.department}")
        if req.workflow:
            scopes.append(f"workflow:{req.workflow}")
        if req.run_id:
            scopes.append(f"run:{req.run_id}")
        return scopes

    async def _run_cost_cents(self, req: ToolCallRequest) -> int:
        if not req.run_id:
            return 0
        usage = await self.budgets.usage(req.tenant, f"run:{req.run_id}", "micros")
        return int((usage.used + usage.reserved) // 10_000)

    async def _release(self, req: ToolCallRequest, tool: ToolDefinition, draw: Draw | None = None) -> None:
        if draw is not None and draw.allotment is not None:
            return  # the price goes back to the allotment when the call settles
        if tool.cost_micros:
            await self.budgets.release(req.call_key)

    async def _stop(
        self,
        req: ToolCallRequest,
        tool: ToolDefinition | None,
        code: str,
        reason: str | None,
        ids: tuple[str, ...] = (),
        *,
        retryable: bool = False,
        audit: bool = True,
    ) -> ToolResult:
        reason = self.redactor.redact_text(reason or code)
        if audit:
            digest = args_digest(req.tool, tool.version if tool else "?", req.args)
            await self._audit(
                req, tool, "tool_call", "denied", reason, digest, {"code": code, "policies": list(ids)}
            )
        status: ResultStatus = "denied"
        return ToolResult(
            status,
            req.tool,
            tool.version if tool else None,
            code=code,
            reason=reason,
            policy_ids=ids,
            retryable=retryable,
        )

    async def _audit(
        self,
        req: ToolCallRequest,
        tool: ToolDefinition | None,
        kind: str,
        outcome: str,
        reason: str | None,
        digest: str | None,
        data: dict[str, Any],
    ) -> None:
        await self.audit.append(self._event(req, tool, kind, outcome, reason, digest, data))

    def _event(
        self,
        req: ToolCallRequest,
        tool: ToolDefinition | None,
        kind: str,
        outcome: str,
        reason: str | None,
        digest: str | None,
        data: dict[str, Any],
    ) -> AuditEvent:
        return AuditEvent(
            ts=time.time(),
            tenant=req.tenant,
            actor=req.actor,
            kind=kind,
            subject=tool.name if tool else req.tool,
            run_id=req.run_id,
            workflow=req.workflow,
            outcome=outcome,
            reason=reason,
            inputs_digest=digest,
            data={**data, "step_key": req.step_key, "call_index": req.call_index, "env": self.env},
        )


async def open_gateway(
    store: SqlStore,
    *,
    policies: str | None = None,
    policy_texts: dict[str, str] | None = None,
    env: str = "dev",
    notifier: Notifier | None = None,
    monitor: bool = True,
) -> ToolGateway:
    """Assemble a gateway on ``store``: policies from a directory or texts, registry, monitor.

    With no policies at all every call is denied (no grant): least privilege by default.
    """
    from controltower.gateway.monitor import Monitor

    registry = ToolRegistry(store)
    texts = dict(policy_texts or {})
    if policies is not None:
        texts.update(read_policy_dir(policies))
    gateway = ToolGateway(store, registry, texts, env=env, notifier=notifier)
    if monitor:
        Monitor(gateway.audit, gateway.controls).attach()
    return gateway
