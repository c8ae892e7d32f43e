"""The step interpreter: runs a spec's steps for one run, replaying what is committed.

The whole engine is one idea (after DBOS and Temporal): every step's result is
written under a stable key (``review#2/draft``, ``fan[3]/score``) before the run
moves on. Running the interpreter again over the same committed results walks the
same path and skips every completed step, so a crash, a restart or a wake-up from
a parked state simply re-runs this code from the top.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from controltower.engine.callables import ImplNotFoundError, resolve
from controltower.engine.context import (
    Parked,
    RunCancelled,
    StepContext,
    StepFailed,
    ToolGate,
    ToolInvocation,
    WaitInfo,
    unit_random,
)
from controltower.engine.payloads import check_schema
from controltower.spec import expressions
from controltower.spec.errors import ErrorInfo, ExpressionError, StepFailure, TowerError
from controltower.spec.models import (
    ActionSpec,
    AgentStep,
    ApprovalStep,
    DelegateStep,
    LoopStep,
    ParallelStep,
    RetryPolicy,
    RouteStep,
    Step,
    SubworkflowStep,
    ToolStep,
    WaitStep,
    WorkflowSpec,
)
from controltower.store.base import RunRecord, SignalRecord, StepRecord

if TYPE_CHECKING:
    from controltower.engine.embedded import EmbeddedEngine

NO_RETRY = RetryPolicy()
_NOT_RETRYABLE = (ImplNotFoundError, ExpressionError)


@dataclass(frozen=True, slots=True)
class StepApproval:
    """An approval step that just started waiting (``requested``) or was escalated: for notifiers."""

    event: str  # requested | escalated
    step_key: str
    step_id: str
    title: str
    prompt: str
    group: str | None  # who may decide; None: any operator
    due_at: float | None
    requested_at: float


@dataclass(slots=True)
class Scope:
    """Names visible to expressions at one nesting level; keys of steps inside it."""

    prefix: str
    parent: Scope | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def child(self, prefix: str, **extra: Any) -> Scope:
        return Scope(prefix=prefix, parent=self, extra=extra)

    def steps(self) -> dict[str, dict[str, Any]]:
        merged = self.parent.steps() if self.parent else {}
        merged.update(self.outputs)
        return merged

    def extras(self) -> dict[str, Any]:
        merged = self.parent.extras() if self.parent else {}
        merged.update(self.extra)
        return merged


class Interpreter:
    def __init__(
        self,
        engine: EmbeddedEngine,
        run: RunRecord,
        spec: WorkflowSpec,
        base_dir: str | None,
        records: dict[str, StepRecord],
        cancel: asyncio.Event,
        signals: list[SignalRecord] | None = None,
    ) -> None:
        self.engine = engine
        self.store = engine.store
        self.run = run
        self.spec = spec
        self.base_dir = base_dir
        self.records = records
        self.cancel = cancel
        self.compensable: list[tuple[str, Step]] = []
        self._signals = signals
        self._taken: set[int] = set()
        self._run_names = {"id": run.id, "workflow": run.workflow, "version": run.version}
        self.approvals: list[StepApproval] = []  # new this pass, never replayed: the engine's hooks

    # -- entry points ----------------------------------------------------------

    async def execute(self) -> Any:
        scope = Scope(prefix="")
        last = await self.run_list(self.spec.steps, scope)
        if self.spec.output is not None:
            return self._render(self.spec.output, scope, key="output")
        return last

    async def compensate(self) -> list[dict[str, Any]]:
        """Run compensations of completed steps, newest first; report each outcome."""
        done = [
            (self.records[key].finished_at or 0.0, key, step)
            for key, step in self.compensable
            if key in self.records and self.records[key].status == "completed"
        ]
        outcomes: list[dict[str, Any]] = []
        for _, key, step in sorted(done, key=lambda item: item[0], reverse=True):
            action = step.compensate
            assert action is not None
            ckey = f"compensate:{key}"
            prior = self.records.get(ckey)
            if prior is not None and prior.status == "completed":
                outcomes.append({"step": key, "status": "completed"})
                continue
            original = self.records[key]
            names = self._names(Scope(prefix=""))
            names["this"] = {"input": original.input, "output": original.output}
            try:
                payload = expressions.render(action.input, names)
                await self._durable_call(
                    step, ckey, "compensation", payload, self._action_call(action), NO_RETRY
                )
                outcomes.append({"step": key, "status": "completed"})
            except (StepFailed, TowerError) as exc:
                outcomes.append({"step": key, "status": "failed", "error": str(exc)})
        return outcomes

    # -- sequencing ------------------------------------------------------------

    async def run_list(self, steps: list[Step], scope: Scope) -> Any:
        index = {step.id: i for i, step in enumerate(steps)}
        i, last = 0, None
        while i < len(steps):
            step = steps[i]
            output, goto = await self.run_step(step, scope)
            scope.outputs[step.id] = {"output": output, "status": "completed"}
            if not isinstance(step, RouteStep):
                last = output
            target = goto or step.next
            if target == "end":
                break
            i = index[target] if target else i + 1
        return last

    async def run_step(self, step: Step, scope: Scope) -> tuple[Any, str | None]:
        if self.cancel.is_set():
            raise RunCancelled()
        key = scope.prefix + step.id
        if step.compensate is not None:
            self.compensable.append((key, step))
        rec = self.records.get(key)
        if rec is not None and rec.status == "completed":
            return rec.output, rec.detail.get("goto")
        if isinstance(step, ToolStep | AgentStep):
            payload: Any = None
            try:
                payload = self._input(step, scope, key)
                if isinstance(step, ToolStep):
                    call = self._tool_call(step.tool)
                else:
                    call = self._agent_call(step.agent)
            except StepFailed as exc:
                await self._save(key, step, step.kind, "failed", time.time(), None, None, error=exc.error)
                raise
            except TowerError as exc:
                error = ErrorInfo.from_exception(exc).to_dict()
                await self._save(key, step, step.kind, "failed", time.time(), payload, None, error=error)
                raise StepFailed(key, error) from None
            agent = step.agent if isinstance(step, AgentStep) else None
            output = await self._durable_call(
                step, key, step.kind, payload, call, step.retry or NO_RETRY, agent=agent
            )
            return output, None
        if isinstance(step, RouteStep):
            return await self._route(step, scope, key)
        if isinstance(step, ApprovalStep):
            return await self._approval(step, scope, key), None
        if isinstance(step, WaitStep):
            return await self._wait(step, key), None
        if isinstance(step, ParallelStep):
            return await self._parallel(step, scope, key), None
        if isinstance(step, LoopStep):
            return await self._loop(step, scope, key), None
        if isinstance(step, DelegateStep):
            return await self._delegate(step, scope, key), None
        if isinstance(step, SubworkflowStep):
            return await self._subworkflow(step, scope, key), None
        raise AssertionError(f"unhandled step kind {step.kind}")  # pragma: no cover

    # -- leaves: tools and agents -------------------------------------------------

    def _tool_call(self, name: str) -> Callable[[Any, StepContext], Awaitable[Any]]:
        if self.engine.tool_gate is not None:
            return _gated_tool_call(self.engine.tool_gate, name)
        tool = self.spec.tools.get(name)
        if tool is None or tool.impl is None:
            raise StepFailure(f"tool {name!r} has no implementation in this workflow")
        impl = resolve(tool.impl, self.base_dir)

        async def call(payload: Any, ctx: StepContext) -> Any:
            check_schema(payload, tool.input_schema, f"input of tool {name!r}")
            out = await impl(payload, ctx)
            check_schema(out, tool.output_schema, f"output of tool {name!r}")
            return out

        return call

    def _agent_call(self, name: str) -> Callable[[Any, StepContext], Awaitable[Any]]:
        from controltower.engine.agents import agent_call

        return agent_call(self.spec, name, self.base_dir)

    def _action_call(self, action: ActionSpec) -> Callable[[Any, StepContext], Awaitable[Any]]:
        if action.tool is not None:
            return self._tool_call(action.tool)
        assert action.agent is not None
        return self._agent_call(action.agent)

    async def _durable_call(
        self,
        step: Step,
        key: str,
        kind: str,
        payload: Any,
        call: Callable[[Any, StepContext], Awaitable[Any]],
        policy: RetryPolicy,
        *,
        agent: str | None = None,
    ) -> Any:
        """Call with retries and a timeout; commit the outcome before returning it."""
        prior = self.records.get(key)
        attempt = prior.attempts if prior is not None and prior.status == "retrying" else 0
        started = prior.started_at if prior is not None and prior.status == "retrying" else time.time()
        limiter = self.engine.limiter(kind)
        while True:
            attempt += 1
            ctx = StepContext(
                run_id=self.run.id,
                step_key=key,
                step_id=step.id,
                workflow=self.run.workflow,
                attempt=attempt,
                tenant=self.run.tenant,
                base_dir=self.base_dir,
                agent=agent,
                gate=self.engine.tool_gate,
                spec=self.spec,
                workflow_version=self.run.version,
                store=self.store,
            )
            try:
                async with limiter:
                    if step.timeout is not None:
                        output = await asyncio.wait_for(call(payload, ctx), step.timeout)
                    else:
                        output = await call(payload, ctx)
                check_schema(output, step.output_schema, f"output of step {step.id!r}")
            except asyncio.CancelledError:
                raise
            except Parked:
                # a governed tool call waits for approval: the step waits with it, and runs
                # again after the decision (calls that completed replay their results)
                detail = {"waiting_for": "approval"}
                await self._save(
                    key, step, kind, "waiting", started, payload, None, attempt - 1, detail=detail
                )
                raise
            except Exception as exc:
                error = ErrorInfo.from_exception(exc)
                if isinstance(exc, TimeoutError):
                    error.message = f"timed out after {step.timeout}s"
                retry = _retryable(exc, policy) and attempt < policy.max_attempts
                status = "retrying" if retry else "failed"
                await self._save(key, step, kind, status, started, payload, None, attempt, error.to_dict())
                if not retry:
                    raise StepFailed(key, error.to_dict()) from None
                await asyncio.sleep(policy.delay(attempt, unit_random(self.run.id, key, attempt)))
                continue
            await self._save(key, step, kind, "completed", started, payload, output, attempt, None)
            return output

    async def _save(
        self,
        key: str,
        step: Step,
        kind: str,
        status: str,
        started: float,
        payload: Any,
        output: Any,
        attempts: int = 1,
        error: dict[str, Any] | None = None,
        detail: dict[str, Any] | None = None,
    ) -> StepRecord:
        rec = StepRecord(
            run_id=self.run.id,
            step_key=key,
            step_id=step.id,
            kind=kind,
            status=status,
            started_at=started,
            finished_at=time.time() if status != "waiting" else None,
            attempts=attempts,
            input=payload,
            output=output,
            error=error,
            detail=detail or {},
        )
        await self.store.save_step(rec, owner=self.engine.owner)
        self.records[key] = rec
        return rec

    # -- control flow --------------------------------------------------------------

    async def _route(self, step: RouteStep, scope: Scope, key: str) -> tuple[Any, str]:
        started = time.time()
        names = self._names(scope)
        goto, matched = step.default, None
        for i, route in enumerate(step.routes):
            if self._eval(route.when, names, key):
                goto, matched = route.goto, i
                break
        output = {"goto": goto, "matched": matched}
        await self._save(key, step, "route", "completed", started, None, output, detail={"goto": goto})
        return output, goto

    async def _loop(self, step: LoopStep, scope: Scope, key: str) -> Any:
        started = time.time()
        last: Any = None
        passed = False
        iteration = 0
        inner: dict[str, Any] = {}
        previous: dict[str, dict[str, Any]] = {}
        for iteration in range(1, step.max_iterations + 1):
            # evaluate-and-revise: an iteration sees the previous one's results, both as
            # `loop.previous.<step>.output` and as `steps.<step>.output` until it reruns that step
            iscope = scope.child(
                f"{key}#{iteration}/",
                loop={"iteration": iteration, "max": step.max_iterations, "previous": previous or None},
            )
            iscope.outputs.update(previous)
            last = await self.run_list(step.body, iscope)
            previous = dict(iscope.outputs)
            inner = {sid: value["output"] for sid, value in iscope.outputs.items()}
            if self._eval(step.until, self._names(iscope), key):
                passed = True
                break
        output = {"iterations": iteration, "passed": passed, "last": last, "steps": inner}
        if not passed and step.on_exhausted == "fail":
            error = {
                "type": "LoopExhausted",
                "code": "loop_exhausted",
                "message": f"loop {step.id!r} did not pass `{step.until}` in {iteration} iterations",
            }
            await self._save(key, step, "loop", "failed", started, None, output, error=error)
            raise StepFailed(key, error)
        await self._save(key, step, "loop", "completed", started, None, output)
        return output

    async def _parallel(self, step: ParallelStep, scope: Scope, key: str) -> Any:
        started = time.time()
        units: list[tuple[str | int, list[Step], Scope]] = []
        if step.branches is not None:
            for name, steps in step.branches.items():
                units.append((name, steps, scope.child(f"{key}[{name}]/")))
        else:
            assert step.map is not None
            items = self._items(step, scope, key)
            for i, item in enumerate(items):
                extra = {step.map.item: item, "index": i}
                units.append((i, step.map.steps, scope.child(f"{key}[{i}]/", **extra)))
        limit = (step.map.max_concurrency if step.map else None) or self.spec.concurrency.max_parallel_steps
        results = await self._join(step, key, units, limit)
        if step.branches is not None:
            output: Any = {name: results.get(name) for name, _, _ in units}
        else:
            output = [results.get(i) for i, _, _ in units]
        await self._save(key, step, "parallel", "completed", started, None, output)
        return output

    def _items(self, step: ParallelStep, scope: Scope, key: str) -> list[Any]:
        assert step.map is not None
        over = step.map.over
        names = self._names(scope)
        items = expressions.render(over, names) if "${{" in over else self._value(over, names, key)
        if not isinstance(items, list):
            error = {
                "type": "InvalidMapInput",
                "code": "invalid_map_input",
                "message": f"map over `{over}` gave {type(items).__name__}, not a list",
            }
            raise StepFailed(key, error)
        return items

    async def _join(
        self,
        step: ParallelStep,
        key: str,
        units: list[tuple[str | int, list[Step], Scope]],
        limit: int | None,
    ) -> dict[str | int, Any]:
        needed = {
            "all": len(units),
            "any": min(1, len(units)),
            "quorum": step.quorum or len(units),
        }[step.join]
        if needed > len(units):  # e.g. a map whose list is shorter than its quorum: never reachable
            raise StepFailed(
                key,
                {
                    "type": "JoinFailed",
                    "code": "join_failed",
                    "message": f"join {step.join} needs {needed} results but there are only "
                    f"{len(units)} branches",
                },
            )
        gate = asyncio.Semaphore(limit) if limit else None

        async def run_unit(steps: list[Step], uscope: Scope) -> Any:
            if gate is None:
                return await self.run_list(steps, uscope)
            async with gate:
                return await self.run_list(steps, uscope)

        tasks = {asyncio.ensure_future(run_unit(steps, uscope)): name for name, steps, uscope in units}
        successes: dict[str | int, Any] = {}
        failures: list[StepFailed] = []
        parked: list[WaitInfo] = []
        pending = set(tasks)
        try:
            while pending and len(successes) < needed:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if exc is None:
                        successes[tasks[task]] = task.result()
                    elif isinstance(exc, Parked):
                        parked.extend(exc.waits)
                    elif isinstance(exc, StepFailed):
                        failures.append(exc)
                    else:
                        raise exc
                if step.join == "all" and failures:
                    raise failures[0]
                if len(units) - len(failures) < needed:
                    raise StepFailed(
                        key,
                        {
                            "type": "JoinFailed",
                            "code": "join_failed",
                            "message": f"{len(failures)} of {len(units)} branches failed; "
                            f"join {step.join} needs {needed} (first: {failures[0]})",
                        },
                    )
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        if len(successes) < needed:
            raise Parked(parked)
        return successes

    async def _delegate(self, step: DelegateStep, scope: Scope, key: str) -> Any:
        started = time.time()
        payload = self._input(step, scope, key)
        policy = step.retry or NO_RETRY
        mkey = f"{key}/manager"
        plan = await self._replayed_or_call(step, mkey, payload, step.manager, policy)
        tasks = plan.get("tasks") if isinstance(plan, dict) else None
        problem = _check_tasks(tasks, step)
        if problem:
            error = {"type": "InvalidDelegation", "code": "invalid_delegation", "message": problem}
            await self._save(key, step, "delegate", "failed", started, payload, plan, error=error)
            raise StepFailed(key, error)
        assert isinstance(tasks, list)
        calls = [
            asyncio.ensure_future(
                self._replayed_or_call(
                    step, f"{key}/task[{i}]", task.get("input", {}), task["worker"], policy
                )
            )
            for i, task in enumerate(tasks)
        ]
        try:
            results = list(await asyncio.gather(*calls))
        except BaseException:
            # one worker failed (or the run was cancelled): stop its siblings, as a join does
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            raise
        output: Any = {"tasks": tasks, "results": results}
        if step.combine is not None:
            combined = {"input": payload, "tasks": tasks, "results": results}
            output = await self._replayed_or_call(step, f"{key}/combine", combined, step.combine, policy)
        await self._save(key, step, "delegate", "completed", started, payload, output)
        return output

    async def _replayed_or_call(
        self, step: Step, key: str, payload: Any, agent: str, policy: RetryPolicy
    ) -> Any:
        rec = self.records.get(key)
        if rec is not None and rec.status == "completed":
            return rec.output
        return await self._durable_call(
            step, key, "agent", payload, self._agent_call(agent), policy, agent=agent
        )

    # -- parking: approvals, waits, child runs ---------------------------------

    async def _approval(self, step: ApprovalStep, scope: Scope, key: str) -> Any:
        rec = self.records.get(key)
        # no decision can exist before the approval is recorded as waiting
        decision = None if rec is None else await self._signal(f"approval:{key}", consume=False)
        if rec is None:
            shown = self._input(step, scope, key) if step.input is not None else None
            # title and sla too: a notifier starting later can announce the wait as it was
            detail = {
                "prompt": step.prompt,
                "group": step.group,
                "title": step.title or step.id,
                "sla": step.sla,
            }
            rec = await self._save(key, step, "approval", "waiting", time.time(), shown, None, detail=detail)
            due = rec.started_at + step.sla if step.sla is not None else None
            self._approval_event("requested", step, rec, step.group, due)
        if decision is not None:
            data = decision.payload if isinstance(decision.payload, dict) else {}
            output = {
                "approved": bool(data.get("approved")),
                "by": data.get("by"),
                "comment": data.get("comment"),
                "decided_at": decision.created_at,
            }
            if not output["approved"] and step.on_reject == "fail":
                error = {
                    "type": "Rejected",
                    "code": "rejected",
                    "message": f"rejected by {output['by']}: {output['comment'] or 'no reason given'}",
                }
                await self._save(
                    key, step, "approval", "failed", rec.started_at, rec.input, output, error=error
                )
                raise StepFailed(key, error)
            await self._save(
                key,
                step,
                "approval",
                "completed",
                rec.started_at,
                rec.input,
                output,
                detail=rec.detail,
            )
            return output
        deadline = rec.started_at + step.sla if step.sla is not None else None
        if rec.detail.get("escalated"):
            deadline = None
        if deadline is not None and time.time() >= deadline:
            if step.on_timeout == "escalate":
                escalated = {**rec.detail, "escalated": True, "group": step.escalate_to}
                await self._save(
                    key, step, "approval", "waiting", rec.started_at, rec.input, None, detail=escalated
                )
                self._approval_event("escalated", step, rec, step.escalate_to, None)
                deadline = None
            else:
                timed_out = {
                    "approved": False,
                    "by": None,
                    "comment": "SLA expired",
                    "timed_out": True,
                }
                if step.on_timeout == "reject" and step.on_reject == "continue":
                    await self._save(key, step, "approval", "completed", rec.started_at, rec.input, timed_out)
                    return timed_out
                error = {
                    "type": "ApprovalTimeout",
                    "code": "approval_timeout",
                    "message": f"no decision on {key!r} within {step.sla}s",
                }
                await self._save(
                    key,
                    step,
                    "approval",
                    "failed",
                    rec.started_at,
                    rec.input,
                    timed_out,
                    error=error,
                )
                raise StepFailed(key, error)
        raise Parked([WaitInfo(key, "approval", f"approval:{key}", deadline)])

    def _approval_event(
        self, event: str, step: ApprovalStep, rec: StepRecord, group: str | None, due: float | None
    ) -> None:
        title = step.title or step.id
        self.approvals.append(
            StepApproval(event, rec.step_key, step.id, title, step.prompt, group, due, rec.started_at)
        )

    async def _wait(self, step: WaitStep, key: str) -> Any:
        rec = self.records.get(key)
        if rec is None:
            detail = {"event": step.event, "duration": step.duration}
            rec = await self._save(key, step, "wait", "waiting", time.time(), None, None, detail=detail)
        deadline = rec.started_at + step.duration if step.duration is not None else None
        if step.event is not None:
            signal = await self._signal(f"event:{step.event}", consume=True)
            if signal is not None:
                output = {"event": step.event, "data": signal.payload, "timed_out": False}
                detail = {**rec.detail, "signal_id": signal.id}
                await self._save(key, step, "wait", "completed", rec.started_at, None, output, detail=detail)
                return output
        if deadline is not None and time.time() >= deadline:
            if step.event is None:
                output = {"waited": step.duration}
            else:
                output = {"event": step.event, "data": None, "timed_out": True}
                if step.on_timeout == "fail":
                    error = {
                        "type": "WaitTimeout",
                        "code": "wait_timeout",
                        "message": f"event {step.event!r} did not arrive within {step.duration}s",
                    }
                    await self._save(key, step, "wait", "failed", rec.started_at, None, output, error=error)
                    raise StepFailed(key, error)
            await self._save(key, step, "wait", "completed", rec.started_at, None, output)
            return output
        kind = "event" if step.event is not None else "timer"
        name = f"event:{step.event}" if step.event is not None else None
        raise Parked([WaitInfo(key, kind, name, deadline)])

    async def _subworkflow(self, step: SubworkflowStep, scope: Scope, key: str) -> Any:
        rec = self.records.get(key)
        payload = self._input(step, scope, key)
        if rec is None or not rec.detail.get("child_run_id"):
            child_id = await self.engine.start_child(self.run, key, step, payload, self.base_dir)
            rec = await self._save(
                key,
                step,
                "subworkflow",
                "waiting",
                time.time(),
                payload,
                None,
                detail={"child_run_id": child_id},
            )
        child = await self.store.get_run(rec.detail["child_run_id"])
        if child is not None and child.status == "completed":
            await self._save(
                key,
                step,
                "subworkflow",
                "completed",
                rec.started_at,
                payload,
                child.output,
                detail=rec.detail,
            )
            return child.output
        if child is not None and child.status in ("failed", "cancelled"):
            error = {
                "type": "ChildRunFailed",
                "code": "child_failed",
                "message": f"child run {child.id} {child.status}: {(child.error or {}).get('message', '')}",
            }
            await self._save(
                key,
                step,
                "subworkflow",
                "failed",
                rec.started_at,
                payload,
                None,
                error=error,
                detail=rec.detail,
            )
            raise StepFailed(key, error)
        raise Parked([WaitInfo(key, "child", f"child:{key}", None)])

    async def _signal(self, name: str, *, consume: bool) -> SignalRecord | None:
        if self._signals is None:
            self._signals = await self.store.list_signals(self.run.id)
        found: SignalRecord | None = None
        for signal in self._signals:
            if signal.name != name or signal.id in self._taken:
                continue
            if consume:
                if signal.consumed_at is None:
                    self._taken.add(signal.id)
                    return signal
            else:
                found = signal  # decisions: the latest one counts
        return found

    # -- expressions -------------------------------------------------------------

    def _names(self, scope: Scope) -> dict[str, Any]:
        names: dict[str, Any] = {
            "input": self.run.input,
            "steps": scope.steps(),
            "run": self._run_names,
        }
        names.update(scope.extras())
        return names

    def _input(self, step: Step, scope: Scope, key: str) -> Any:
        if step.input is None:
            return {}
        return self._render(step.input, scope, key)

    def _render(self, template: Any, scope: Scope, key: str) -> Any:
        try:
            return expressions.render(template, self._names(scope))
        except ExpressionError as exc:
            raise StepFailed(
                key, {"type": "ExpressionError", "code": exc.code, "message": str(exc)}
            ) from None

    def _value(self, expr: str, names: dict[str, Any], key: str) -> Any:
        try:
            return expressions.evaluate(expr, names)
        except ExpressionError as exc:
            raise StepFailed(
                key, {"type": "ExpressionError", "code": exc.code, "message": str(exc)}
            ) from None

    def _eval(self, expr: str, names: dict[str, Any], key: str) -> bool:
        return bool(self._value(expr, names, key))


def _retryable(exc: Exception, policy: RetryPolicy) -> bool:
    if isinstance(exc, StepFailure):
        return exc.retryable
    if isinstance(exc, _NOT_RETRYABLE):
        return False
    code = getattr(exc, "code", None)
    return not (type(exc).__name__ in policy.non_retryable or (code and code in policy.non_retryable))


def _check_tasks(tasks: Any, step: DelegateStep) -> str | None:
    if not isinstance(tasks, list):
        return f"manager {step.manager!r} must return {{'tasks': [{{'worker': NAME, 'input': {{...}}}}]}}"
    if len(tasks) > step.max_tasks:
        return f"manager returned {len(tasks)} tasks; max_tasks is {step.max_tasks}"
    allowed = ", ".join(step.workers)
    for i, task in enumerate(tasks):
        if not isinstance(task, dict) or task.get("worker") not in step.workers:
            worker = task.get("worker") if isinstance(task, dict) else task
            return f"task {i} names worker {worker!r}; allowed: {allowed}"
    return None


class ToolCallStopped(StepFailure):
    """The gateway stopped a tool step (denied, rejected, over budget, ...): a typed outcome."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message, retryable=retryable)
        self.code = code


def _gated_tool_call(gate: ToolGate, name: str) -> Callable[[Any, StepContext], Awaitable[Any]]:
    async def call(payload: Any, ctx: StepContext) -> Any:
        outcome = await gate.invoke(ToolInvocation(tool=name, args=payload, ctx=ctx))
        if outcome.status == "ok":
            return outcome.output
        if outcome.status == "drafted":
            return {"status": "drafted", "tool": name, "args": payload, "reason": outcome.reason}
        if outcome.status == "pending_approval":
            assert outcome.wait is not None
            raise Parked([outcome.wait])
        raise ToolCallStopped(
            outcome.code or outcome.status, outcome.reason or outcome.status, retryable=outcome.retryable
        )

    return call
