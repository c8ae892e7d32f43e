"""Run an eval suite on the embedded engine: a fresh store and sandbox per suite, approvals
decided by a labelled auto-approver, every case checked against its expected outcome."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltower.engine import EmbeddedEngine
from controltower.engine.context import GateOutcome, ToolGate, ToolInvocation
from controltower.evals.matching import MISSING, Mismatch, match
from controltower.evals.result import CaseResult, Failure, SuiteResult, gate, load_baseline, verdict
from controltower.evals.suite import Case, CountRange, Decision, Expect, Suite, load_suite
from controltower.spec.errors import InvalidInputError
from controltower.spec.models import LoopStep, ParallelStep, Step, ToolStep, WorkflowSpec
from controltower.store import TERMINAL
from controltower.store.base import StepRecord, WorkflowRecord

if TYPE_CHECKING:
    from controltower.gateway.pipeline import ToolGateway


@dataclass(slots=True)
class ToolCallSeen:
    tool: str
    status: str  # ok | denied | pending_approval | drafted | error
    code: str | None


@dataclass
class RecordingGate:
    """Wraps the engine's tool gate and remembers every call's outcome per run."""

    inner: ToolGate
    calls: dict[str, list[ToolCallSeen]] = field(default_factory=dict)

    async def invoke(self, call: ToolInvocation) -> GateOutcome:
        outcome = await self.inner.invoke(call)
        seen = ToolCallSeen(call.tool, outcome.status, outcome.code)
        self.calls.setdefault(call.ctx.run_id, []).append(seen)
        return outcome

    async def on_publish(self, spec: WorkflowSpec, record: WorkflowRecord, base_dir: str | None) -> None:
        await self.inner.on_publish(spec, record, base_dir)

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class _Harness:
    suite: Suite
    spec: WorkflowSpec
    engine: EmbeddedEngine
    gateway: ToolGateway | None
    recorder: RecordingGate | None
    base_dir: str


async def run_suite(
    path: str | Path, *, db: str | None = None, baseline: str | Path | None = None
) -> SuiteResult:
    """Run every case of the suite at ``path`` (an eval.yaml or a directory holding one)."""
    from controltower.spec.loader import load_spec_file

    suite = load_suite(path)
    spec = load_spec_file(suite.workflow_path)
    prior = load_baseline(baseline) if baseline is not None else None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tower-eval-") as tmp, _environment(suite, Path(tmp)):
        url = db or f"sqlite:///{Path(tmp) / 'tower.db'}"
        engine = await EmbeddedEngine.open(url, synchronous="NORMAL")
        try:
            harness = await _attach(suite, spec, engine)
            limit = asyncio.Semaphore(suite.spec.concurrency)

            async def one(case: Case) -> CaseResult:
                async with limit:
                    return await _run_case(harness, case)

            cases = list(await asyncio.gather(*[one(c) for c in suite.cases]))
        finally:
            await engine.close()
    name = suite.spec.suite or spec.name
    result = verdict(name, spec.name, cases, suite.spec.pass_.min_pass_rate, time.monotonic() - started)
    return gate(result, prior) if prior is not None else result


@contextlib.contextmanager
def _environment(suite: Suite, tmp: Path) -> Iterator[None]:
    """TOWER_HOME in the temp dir (fresh sandboxes), no TOWER_MODEL unless asked, the suite's env."""
    changes: dict[str, str | None] = {"TOWER_HOME": str(tmp / "home")}
    if not suite.spec.use_model:
        changes["TOWER_MODEL"] = None
    changes.update(suite.spec.env)
    saved = {key: os.environ.get(key) for key in changes}
    try:
        for key, value in changes.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


async def _attach(suite: Suite, spec: WorkflowSpec, engine: EmbeddedEngine) -> _Harness:
    base_dir = str(suite.workflow_path.parent)
    policies = suite.policies_dir
    if policies is None:
        return _Harness(suite, spec, engine, None, None, base_dir)
    if not policies.is_dir():
        raise InvalidInputError(
            f"policies folder {policies} does not exist", hint="fix `policies:` in the suite"
        )
    from controltower.gateway.engine_gate import GovernedToolGate
    from controltower.gateway.pipeline import open_gateway

    env = suite.spec.env.get("TOWER_ENV") or os.environ.get("TOWER_ENV") or "dev"
    # no governance monitor: a suite fires many identical calls on purpose, and a pause
    # triggered by that burst would make results depend on timing
    gateway = await open_gateway(engine.store, policies=str(policies), env=env, monitor=False)
    recorder = RecordingGate(GovernedToolGate(gateway))
    engine.tool_gate = recorder
    return _Harness(suite, spec, engine, gateway, recorder, base_dir)


async def _run_case(h: _Harness, case: Case) -> CaseResult:
    started = time.monotonic()
    timeout = case.timeout or h.suite.spec.timeout
    base = {"id": case.id, "description": case.description, "required": case.required}
    try:
        run_id = await h.engine.start(h.spec, case.input, base_dir=h.base_dir)
    except InvalidInputError as exc:
        facts = _Facts(status="invalid_input", error=exc.message)
        return _finish(h, case, base, None, facts, started)
    facts = await _drive(h, case, run_id, started + timeout)
    return _finish(h, case, base, run_id, facts, started)


@dataclass
class _Facts:
    status: str
    output: Any = None
    error: str | None = None
    steps: dict[str, StepRecord] = field(default_factory=dict)
    approvals: int = 0
    calls: list[ToolCallSeen] = field(default_factory=list)


async def _drive(h: _Harness, case: Case, run_id: str, deadline: float) -> _Facts:
    """Run to the end, deciding approvals as the case says; stop at `leave`, events, timers."""
    label = h.suite.spec.approver.label
    handled: set[str] = set()
    decided_keys: set[str] = set()
    status = "timeout"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            run = await h.engine.wait(run_id, statuses=TERMINAL | {"waiting"}, timeout=left)
        except TimeoutError:
            break
        if run.status in TERMINAL:
            status = run.status
            break
        records = await h.engine.store.load_steps(run_id)
        acted = left_one = False
        for rec in sorted(records.values(), key=lambda r: r.started_at):
            if rec.kind != "approval" or rec.status != "waiting" or rec.step_key in handled:
                continue
            handled.add(rec.step_key)
            choice = _decision(h, case, rec.step_id, rec.step_key)
            if choice == "leave":
                left_one = True
                continue
            await h.engine.decide(
                run_id, rec.step_key, approved=choice == "approve", by=label, comment=f"eval: {case.id}"
            )
            decided_keys.add(rec.step_key)
            acted = True
        if h.gateway is not None:
            from controltower.gateway.approvals import Approver

            for req in await h.gateway.approvals.list(run_id=run_id):
                if req.id in handled:
                    continue
                handled.add(req.id)
                choice = _decision(h, case, f"tool:{_short(h.spec, req.tool)}", None)
                if choice == "leave":
                    left_one = True
                    continue
                await h.gateway.decide(
                    req.id,
                    approver=Approver(label, "admin"),
                    approve=choice == "approve",
                    reason=f"eval: {case.id}",
                )
                await h.engine.wake(run_id)
                decided_keys.add(req.step_key or "")
                acted = True
        if acted:
            continue
        still = {r.step_key for r in records.values() if r.status == "waiting"}
        if left_one or not (still & decided_keys):
            status = "waiting"  # parked on something this eval does not decide
            break
        await asyncio.sleep(0.01)  # a decision was sent; the run has not picked it up yet
    run = await h.engine.get(run_id)
    records = await h.engine.store.load_steps(run_id)
    approvals = sum(1 for r in records.values() if r.kind == "approval")
    if h.gateway is not None:
        approvals += len(await h.gateway.approvals.list(run_id=run_id, status=None))
    calls = list(h.recorder.calls.get(run_id, [])) if h.recorder is not None else _ungated_calls(h, records)
    error = None
    if run.error:
        error = str(run.error.get("message", "")) or str(run.error)
    return _Facts(status, run.output, error, records, approvals, calls)


def _decision(h: _Harness, case: Case, name: str, key: str | None) -> Decision:
    chosen = case.approvals
    if isinstance(chosen, str):
        return chosen
    if isinstance(chosen, dict):
        for candidate in (name, key, "*"):
            if candidate is not None and candidate in chosen:
                return chosen[candidate]
    return h.suite.spec.approver.default


def _short(spec: WorkflowSpec, tool: str) -> str:
    prefix = f"{spec.name}."
    return tool[len(prefix) :] if tool.startswith(prefix) else tool


def _ungated_calls(h: _Harness, records: dict[str, StepRecord]) -> list[ToolCallSeen]:
    tools = _tool_steps(h.spec.steps)
    calls = []
    for rec in sorted(records.values(), key=lambda r: r.started_at):
        if rec.kind == "tool" and rec.step_id in tools:
            ok = rec.status == "completed"
            calls.append(ToolCallSeen(tools[rec.step_id], "ok" if ok else "error", None if ok else "error"))
    return calls


def _tool_steps(steps: list[Step]) -> dict[str, str]:
    found: dict[str, str] = {}
    for step in steps:
        if isinstance(step, ToolStep):
            found[step.id] = step.tool
        elif isinstance(step, LoopStep):
            found.update(_tool_steps(step.body))
        elif isinstance(step, ParallelStep):
            for branch in (step.branches or {}).values():
                found.update(_tool_steps(branch))
            if step.map is not None:
                found.update(_tool_steps(step.map.steps))
    return found


def _finish(
    h: _Harness, case: Case, base: dict[str, Any], run_id: str | None, facts: _Facts, started: float
) -> CaseResult:
    called = sorted({c.tool for c in facts.calls if c.status == "ok"})
    escalated = _escalated(h, facts, called)
    failures = _check(case.expect, facts, called, escalated)
    return CaseResult(
        **base,
        passed=not failures,
        status=facts.status,
        run_id=run_id,
        duration_s=round(time.monotonic() - started, 4),
        approvals=facts.approvals,
        escalated=escalated,
        tools_called=called,
        output=facts.output,
        error=facts.error,
        failures=failures,
    )


def _escalated(h: _Harness, facts: _Facts, called: list[str]) -> bool:
    rule = h.suite.spec.escalation
    if any(tool in called for tool in rule.tools):
        return True
    return rule.output is not None and facts.output is not None and not match(facts.output, rule.output)


def _check(expect: Expect, facts: _Facts, called: list[str], escalated: bool) -> list[Failure]:
    failures: list[Failure] = []

    def fail(check: str, expected: Any, actual: Any, message: str = "") -> None:
        failures.append(Failure(check=check, expected=expected, actual=actual, message=message))

    if expect.status is not None and facts.status != expect.status:
        fail("status", expect.status, facts.status, facts.error or "")
    if expect.output is not None:
        failures.extend(_mismatches("output", match(facts.output, expect.output)))
    if expect.steps is not None:
        failures.extend(_mismatches("steps", match(_step_view(facts.steps), expect.steps)))
    ran = {r.step_id for r in facts.steps.values() if r.status != "skipped"}
    for step in expect.steps_ran or []:
        if step not in ran:
            fail(f"steps_ran.{step}", "ran", "did not run")
    for step in expect.steps_not_ran or []:
        if step in ran:
            fail(f"steps_not_ran.{step}", "did not run", "ran")
    for tool in expect.tools_called or []:
        if tool not in called:
            fail(f"tools_called.{tool}", "called", "not called", _last_outcome(facts, tool) or "")
    for tool in expect.tools_not_called or []:
        if tool in called:
            fail(f"tools_not_called.{tool}", "not called", "called")
    for tool, outcome in (expect.tool_outcomes or {}).items():
        actual = _last_outcome(facts, tool)
        if actual != outcome:
            fail(f"tool_outcomes.{tool}", outcome, actual or "never called")
    if expect.approvals is not None:
        want = expect.approvals
        if isinstance(want, CountRange):
            low, high = want.min, want.max
            if (low is not None and facts.approvals < low) or (high is not None and facts.approvals > high):
                fail("approvals", want.model_dump(exclude_none=True), facts.approvals)
        elif facts.approvals != want:
            fail("approvals", want, facts.approvals)
    if expect.escalated is not None and escalated != expect.escalated:
        fail("escalated", expect.escalated, escalated)
    if expect.error is not None and expect.error not in (facts.error or ""):
        fail("error", expect.error, facts.error, "substring not found")
    return failures


def _mismatches(root: str, found: list[Mismatch]) -> list[Failure]:
    return [
        Failure(
            check=f"{root}.{m.path}",
            expected=m.expected,
            actual=None if m.actual is MISSING else m.actual,
            message=m.message,
        )
        for m in found
    ]


def _step_view(records: dict[str, StepRecord]) -> dict[str, Any]:
    view: dict[str, Any] = {}
    for rec in sorted(records.values(), key=lambda r: r.started_at):
        view[rec.step_id] = {"status": rec.status, "output": rec.output, "kind": rec.kind}
    return view


def _last_outcome(facts: _Facts, tool: str) -> str | None:
    for call in reversed(facts.calls):
        if call.tool == tool:
            return "ok" if call.status == "ok" else (call.code or call.status)
    return None
