"""The embedded engine: asyncio, in-process, durable through a Store.

It owns leases on the runs it executes (so two processes sharing PostgreSQL never
execute one run at once), parks runs that wait on the outside world as plain rows,
and wakes them on a signal, a timer or a poll of the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from controltower.engine.context import Parked, RunCancelled, StepFailed, ToolGate
from controltower.engine.interpreter import Interpreter, StepApproval
from controltower.engine.payloads import check_schema
from controltower.memory import Memory, bind_memory
from controltower.spec.errors import (
    ConflictError,
    InvalidInputError,
    InvalidStateError,
    LeaseLostError,
    NotFoundError,
    StepFailure,
    TowerError,
)
from controltower.spec.ids import new_id
from controltower.spec.models import SubworkflowStep, WorkflowSpec
from controltower.store import TERMINAL, RunFilter, RunRecord, SqlStore, WorkflowRecord, open_store
from controltower.store.sql import dumps

log = logging.getLogger("controltower.engine")

MAX_INPUT_BYTES = 10 * 1024 * 1024


def spec_digest(spec: WorkflowSpec) -> str:
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class EmbeddedEngine:
    """Runs workflows in this process; state lives in the store."""

    def __init__(
        self,
        store: SqlStore,
        *,
        owner: str | None = None,
        lease: float = 30.0,
        poll_interval: float = 0.5,
        step_limits: dict[str, int] | None = None,
        tool_gate: ToolGate | None = None,
    ) -> None:
        self.store = store
        self.tool_gate = tool_gate
        self.memory = Memory(store)  # what steps reach as ctx.memory
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{new_id('eng')[-6:]}"
        self.lease = lease
        self.poll_interval = poll_interval
        self._limits = {kind: asyncio.Semaphore(n) for kind, n in (step_limits or {}).items()}
        self._workflow_gates: dict[str, asyncio.Semaphore] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancelling: dict[str, asyncio.Event] = {}
        self._rewake: set[str] = set()
        self._status_events: dict[str, asyncio.Event] = {}
        self._published: dict[int, tuple[WorkflowSpec, WorkflowRecord]] = {}
        self._specs: dict[tuple[str, int], tuple[WorkflowSpec, str | None]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._spawns_children: dict[tuple[str, int], bool] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._closed = False
        # called with the finished record when a run fails (notifications); errors are logged only
        self.failure_hooks: list[Callable[[RunRecord], Awaitable[None]]] = []
        # called once per approval step that starts waiting (or is escalated), after the run parks
        self.approval_hooks: list[Callable[[RunRecord, StepApproval], Awaitable[None]]] = []

    @classmethod
    async def open(
        cls, url: str | None = None, *, synchronous: str = "FULL", **options: Any
    ) -> EmbeddedEngine:
        """Open the store at ``url`` (default: TOWER_DB_URL or .tower/tower.db).

        Step-kind limits come from ``step_limits`` or TOWER_STEP_LIMITS ("agent=8,tool=32").
        """
        if "step_limits" not in options and os.environ.get("TOWER_STEP_LIMITS"):
            options["step_limits"] = parse_limits(os.environ["TOWER_STEP_LIMITS"])
        store = await open_store(url, synchronous=synchronous)
        return cls(store, **options)

    async def __aenter__(self) -> EmbeddedEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def limiter(self, kind: str) -> contextlib.AbstractAsyncContextManager[Any]:
        gate = self._limits.get(kind)
        return gate if gate is not None else contextlib.nullcontext()

    # -- workflow versions -----------------------------------------------------

    async def publish(self, spec: WorkflowSpec, base_dir: str | None = None) -> WorkflowRecord:
        """Publish ``spec`` as an immutable version (the same content keeps its version)."""
        cached = self._published.get(id(spec))
        if cached is not None and cached[0] is spec:
            return cached[1]
        record = await self.store.publish(
            spec.name, spec.model_dump(mode="json"), spec_digest(spec), base_dir, time.time()
        )
        if self.tool_gate is not None:  # the workflow's own tools join the registry, pinned to this version
            await self.tool_gate.on_publish(spec, record, base_dir)
        self._published[id(spec)] = (spec, record)
        self._specs[(record.name, record.version)] = (spec, record.base_dir)
        return record

    async def spec_for(self, name: str, version: int) -> tuple[WorkflowSpec, str | None]:
        cached = self._specs.get((name, version))
        if cached is not None:
            return cached
        record = await self.store.get_workflow(name, version)
        if record is None:
            raise NotFoundError(f"workflow {name!r} version {version} is not in the store")
        loaded = (WorkflowSpec.model_validate(record.spec), record.base_dir)
        self._specs[(name, version)] = loaded
        return loaded

    # -- starting runs -----------------------------------------------------------

    async def start(
        self,
        spec: WorkflowSpec | str,
        input: Any = None,
        *,
        version: int | None = None,
        idempotency_key: str | None = None,
        tenant: str = "default",
        base_dir: str | None = None,
        execute: bool = True,
        parent: tuple[str, str] | None = None,
    ) -> str:
        """Start a run and return its id; a repeated idempotency key returns the first run."""
        record: WorkflowRecord | None
        if isinstance(spec, str):
            record = await self.store.get_workflow(spec, version)
            if record is None:
                raise NotFoundError(
                    f"no published workflow named {spec!r}" + (f" with version {version}" if version else ""),
                    hint="publish it first: tower publish FILE",
                )
            spec_obj, _ = await self.spec_for(record.name, record.version)
        else:
            spec_obj, record = spec, None
        payload = _normalise_input(input)
        try:
            check_schema(payload, spec_obj.input_schema, f"input of workflow {spec_obj.name!r}")
        except StepFailure as exc:
            raise InvalidInputError(
                exc.message, hint="fix the input or the workflow's input_schema"
            ) from None
        if record is None:  # bad input writes nothing, not even a new version
            record = await self.publish(spec_obj, base_dir)
        now = time.time()
        run = RunRecord(
            id=new_id("run"),
            workflow=record.name,
            version=record.version,
            status="running" if execute else "pending",
            input=payload,
            created_at=now,
            updated_at=now,
            tenant=tenant,
            idempotency_key=idempotency_key,
            parent_run_id=parent[0] if parent else None,
            parent_step_key=parent[1] if parent else None,
            owner=self.owner if execute else None,
            lease_expires_at=now + self.lease if execute else None,
        )
        stored, created = await self.store.create_run(run)
        if created and execute:
            self._spawn(stored.id, stored, fresh=True)
        return stored.id

    async def start_child(
        self, parent: RunRecord, key: str, step: SubworkflowStep, payload: Any, base_dir: str | None
    ) -> str:
        target: WorkflowSpec | str = step.workflow
        if step.workflow.endswith((".yaml", ".yml")):
            from controltower.spec.loader import load_spec_file

            path = Path(base_dir or ".", step.workflow)
            target = await asyncio.to_thread(load_spec_file, path)
            base_dir = str(path.absolute().parent)
        return await self.start(
            target,
            payload,
            version=step.version,
            idempotency_key=f"{parent.id}/{key}",
            tenant=parent.tenant,
            base_dir=base_dir,
            parent=(parent.id, key),
        )

    # -- operating on runs ---------------------------------------------------------

    async def get(self, run_id: str) -> RunRecord:
        run = await self.store.get_run(run_id)
        if run is None:
            raise NotFoundError(f"no run {run_id!r}", hint="list runs with: tower runs")
        return run

    async def wait(
        self, run_id: str, *, statuses: Iterable[str] = TERMINAL, timeout: float | None = None
    ) -> RunRecord:
        """Wait until the run reaches one of ``statuses`` (default: finished)."""
        wanted = frozenset(statuses)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            event = self._status_event(run_id)
            run = await self.get(run_id)
            if run.status in wanted:
                return run
            if run.status in TERMINAL:
                raise InvalidStateError(f"run {run_id} is {run.status}; it will not become {sorted(wanted)}")
            left = self.poll_interval
            if deadline is not None:
                left = min(left, deadline - time.monotonic())
                if left <= 0:
                    raise TimeoutError(f"run {run_id} is still {run.status}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), left)

    async def approve(self, run_id: str, step: str, *, by: str, comment: str | None = None) -> str:
        return await self.decide(run_id, step, approved=True, by=by, comment=comment)

    async def reject(self, run_id: str, step: str, *, by: str, comment: str | None = None) -> str:
        return await self.decide(run_id, step, approved=False, by=by, comment=comment)

    async def decide(
        self, run_id: str, step: str, *, approved: bool, by: str, comment: str | None = None
    ) -> str:
        """Record a decision on a waiting approval (by step id or key) and resume the run."""
        run, records, _signals = await self.store.load_state(run_id)
        if run is None:
            raise NotFoundError(f"no run {run_id!r}", hint="list runs with: tower runs")
        if run.status in TERMINAL:
            raise InvalidStateError(f"run {run_id} is {run.status}; nothing to approve")
        waiting = [r for r in records.values() if r.kind == "approval" and r.status == "waiting"]
        matches = [r for r in waiting if step in (r.step_key, r.step_id)]
        if not matches:
            keys = ", ".join(r.step_key for r in waiting) or "none"
            raise NotFoundError(
                f"run {run_id} has no approval waiting at {step!r}",
                hint=f"waiting approvals: {keys}",
            )
        if len(matches) > 1:
            raise ConflictError(
                f"{step!r} matches {len(matches)} waiting approvals",
                hint="name one by its key: " + ", ".join(r.step_key for r in matches),
            )
        key = matches[0].step_key
        data = {"approved": approved, "by": by, "comment": comment}
        # the check and the write are one transaction (and a unique index): one decision wins
        if await self.store.send_signal_once(run_id, f"approval:{key}", data, time.time()) is None:
            raise ConflictError(f"approval {key!r} of run {run_id} is already decided")
        await self.wake(run_id)
        return key

    async def signal(self, run_id: str, event: str, data: Any = None) -> None:
        run = await self.get(run_id)
        if run.status in TERMINAL:
            raise InvalidStateError(f"run {run_id} is {run.status}; it takes no more events")
        await self.store.send_signal(run_id, f"event:{event}", _normalise_input(data), time.time())
        await self.wake(run_id)

    async def cancel(self, run_id: str, *, reason: str | None = None) -> RunRecord:
        run = await self.get(run_id)
        if run.status in TERMINAL:
            raise InvalidStateError(f"run {run_id} is already {run.status}")
        await self.store.update_run(run_id, {"cancel_requested": True, "updated_at": time.time()})
        task = self._tasks.get(run_id)
        if task is not None:
            self._cancelling.setdefault(run_id, asyncio.Event()).set()
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        elif await self.store.claim_run(run_id, self.owner, time.time(), self.lease):
            await self._finish(
                run, "cancelled", error={"code": "cancelled", "message": reason or "cancelled"}
            )
        return await self.get(run_id)

    async def resume(self, run_id: str) -> None:
        """Resume a failed run from the step that failed; completed steps are not re-run."""
        run = await self.get(run_id)
        if run.status != "failed":
            raise InvalidStateError(f"run {run_id} is {run.status}; only failed runs can be resumed")
        # Steps whose effects compensation undid must run again: forget them, their compensation
        # records, and every enclosing step (a parallel or loop that completed around them).
        records = await self.store.load_steps(run_id)
        undone = [k.removeprefix("compensate:") for k in records if k.startswith("compensate:")]
        forget = {k for u in undone for k in (u, f"compensate:{u}")}
        forget |= {k for k in records for u in undone if u.startswith((f"{k}[", f"{k}#"))}
        await self.store.delete_steps(run_id, sorted(forget))
        ok = await self.store.set_run_status(
            run_id,
            "pending",
            time.time(),
            expect=("failed",),
            extra={"error": None, "finished_at": None, "owner": None, "lease_expires_at": None},
        )
        if not ok:
            raise ConflictError(f"run {run_id} changed while resuming; try again")
        self._notify(run_id)
        await self.wake(run_id)

    async def wake(self, run_id: str) -> bool:
        """Try to take the run and drive it here; False when another process holds it."""
        if self._closed:
            return False
        if run_id in self._tasks:
            self._rewake.add(run_id)
            return True
        if not await self.store.claim_run(run_id, self.owner, time.time(), self.lease):
            return False
        if run_id not in self._tasks:
            self._spawn(run_id)
        return True

    async def work(self, stop: asyncio.Event | None = None, *, max_active: int = 1000) -> None:
        """Worker loop: claim runnable runs (new, woken, or orphaned by a crash) and drive them."""
        stop = stop or asyncio.Event()
        while not stop.is_set() and not self._closed:
            room = max_active - len(self._tasks)
            if room > 0:
                for run_id in await self.store.claim_ready(self.owner, time.time(), self.lease, room):
                    if run_id not in self._tasks:
                        self._spawn(run_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_interval)

    async def recover(self) -> int:
        """One pass of the worker loop: take over every runnable run. Returns how many."""
        ids = await self.store.claim_ready(self.owner, time.time(), self.lease, 10_000)
        for run_id in ids:
            if run_id not in self._tasks:
                self._spawn(run_id)
        return len(ids)

    async def drain(self) -> None:
        """Wait until this engine has no run in progress."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in self._timers.values():
            handle.cancel()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(BaseException):
                await self._heartbeat
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.tool_gate is not None:
            await self.tool_gate.aclose()
        await self.store.close()

    # -- driving one run -----------------------------------------------------------

    def _spawn(self, run_id: str, run: RunRecord | None = None, *, fresh: bool = False) -> None:
        task = asyncio.get_running_loop().create_task(self._drive(run_id, run, fresh), name=run_id)
        self._tasks[run_id] = task
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def _drive(self, run_id: str, run: RunRecord | None, fresh: bool) -> None:
        parked = False
        bind_memory(self.memory)  # this task's context only
        try:
            signals = None
            if not fresh:
                run, records, signals = await self.store.load_state(run_id)
                if run is None:
                    return
            else:
                assert run is not None
                records = {}
            if run.status in TERMINAL:
                return
            if run.cancel_requested:
                await self._finish(run, "cancelled", error={"code": "cancelled", "message": "cancelled"})
                return
            spec, base_dir = await self.spec_for(run.workflow, run.version)
            cancel = self._cancelling.setdefault(run_id, asyncio.Event())
            interp = Interpreter(self, run, spec, base_dir, records, cancel, signals)
            try:
                async with self._workflow_gate(spec):
                    output = await interp.execute()
            except Parked as exc:
                parked = True
                await self._park(run, exc)
                await self._approvals_waiting(run, interp.approvals)
            except StepFailed as exc:
                compensation = await interp.compensate()
                error = dict(exc.error)
                error["step"] = exc.step_key
                if compensation:
                    error["compensation"] = compensation
                await self._finish(run, "failed", error=error)
            except (RunCancelled, asyncio.CancelledError):
                if not cancel.is_set():
                    raise
                await self._finish(run, "cancelled", error={"code": "cancelled", "message": "cancelled"})
            else:
                await self._finish(run, "completed", output=output)
        except asyncio.CancelledError:
            # shutdown or a lost lease: leave the run for whoever holds it next
            with contextlib.suppress(BaseException):
                await self.store.release_run(run_id, self.owner)
        except LeaseLostError as exc:
            log.warning("%s", exc)
        except TowerError as exc:
            await self._fail_quietly(
                run_id, run, {"type": type(exc).__name__, "code": exc.code, "message": str(exc)}
            )
        except Exception as exc:
            log.exception("engine error while driving %s", run_id)
            await self._fail_quietly(
                run_id,
                run,
                {"type": type(exc).__name__, "code": "engine_error", "message": str(exc)},
            )
        finally:
            self._tasks.pop(run_id, None)
            self._cancelling.pop(run_id, None)
            self._notify(run_id)
            if run_id in self._rewake:
                self._rewake.discard(run_id)
                if parked and not self._closed:
                    asyncio.get_running_loop().create_task(self.wake(run_id))

    async def _fail_quietly(self, run_id: str, run: RunRecord | None, error: dict[str, Any]) -> None:
        try:
            if run is not None:
                await self._finish(run, "failed", error=error)
        except Exception:
            log.exception("could not record failure of %s", run_id)

    def _workflow_gate(self, spec: WorkflowSpec) -> contextlib.AbstractAsyncContextManager[Any]:
        limit = spec.concurrency.max_runs
        if limit is None:
            return contextlib.nullcontext()
        gate = self._workflow_gates.get(spec.name)
        if gate is None:
            gate = self._workflow_gates[spec.name] = asyncio.Semaphore(limit)
        return gate

    async def _park(self, run: RunRecord, parked: Parked) -> None:
        deadlines = [w.deadline for w in parked.waits if w.deadline is not None]
        wake_at = min(deadlines) if deadlines else None
        waiting_on = ", ".join(f"{w.kind}:{w.step_key}" for w in parked.waits)
        names = sorted({w.signal for w in parked.waits if w.signal})
        if await self.store.park_run(run.id, time.time(), wake_at, waiting_on, names, owner=self.owner):
            self._rewake.add(run.id)
        self._notify(run.id)
        if wake_at is not None:
            self._schedule(run.id, wake_at)

    async def _approvals_waiting(self, run: RunRecord, approvals: list[StepApproval]) -> None:
        for approval in approvals:
            for hook in self.approval_hooks:
                try:
                    await hook(run, approval)
                except Exception:
                    log.exception("approval hook failed for %s %s", run.id, approval.step_key)

    def _schedule(self, run_id: str, when: float) -> None:
        old = self._timers.pop(run_id, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - time.time())
        self._timers[run_id] = loop.call_later(delay, lambda: loop.create_task(self.wake(run_id)))

    async def _finish(
        self, run: RunRecord, status: str, *, output: Any = None, error: dict[str, Any] | None = None
    ) -> None:
        now = time.time()
        finished = await self.store.set_run_status(
            run.id,
            status,
            now,
            expect=("pending", "running", "waiting"),
            owner=self.owner,
            extra={
                "output": output,
                "error": error,
                "finished_at": now,
                "owner": None,
                "lease_expires_at": None,
                "wake_at": None,
                "waiting_on": None,
            },
        )
        if not finished:
            raise LeaseLostError(f"run {run.id} is no longer ours to finish; another engine took it over")
        self._notify(run.id)
        if status == "failed":
            for hook in self.failure_hooks:
                try:
                    await hook(dataclasses.replace(run, status=status, error=error, finished_at=now))
                except Exception:
                    log.exception("run failure hook failed for %s", run.id)
        await self._cancel_children(run, status)
        if run.parent_run_id and run.parent_step_key:
            data = {"run_id": run.id, "status": status}
            await self.store.send_signal(run.parent_run_id, f"child:{run.parent_step_key}", data, now)
            await self.wake(run.parent_run_id)

    async def _cancel_children(self, run: RunRecord, status: str) -> None:
        """A child run exists only for its parent: once the parent ends, its active children stop."""
        if not await self._has_subworkflows(run):
            return
        run_id = run.id
        active = ("pending", "running", "waiting")
        before: str | None = None
        while True:
            flt = RunFilter(parent_run_id=run_id, status=active, limit=500, before_id=before)
            children = await self.store.list_runs(flt)
            for child in children:
                with contextlib.suppress(InvalidStateError):
                    await self.cancel(child.id, reason=f"parent run {run_id} is {status}")
            if len(children) < flt.limit:
                return
            before = children[-1].id

    async def _has_subworkflows(self, run: RunRecord) -> bool:
        key = (run.workflow, run.version)
        known = self._spawns_children.get(key)
        if known is None:
            spec, _ = await self.spec_for(run.workflow, run.version)
            known = self._spawns_children[key] = _mentions_kind(spec.model_dump(mode="json"), "subworkflow")
        return known

    async def _beat(self) -> None:
        """Renew leases of the runs in progress; stop runs whose lease was lost or that were cancelled."""
        interval = max(self.lease / 3, 0.05)
        while self._tasks and not self._closed:
            await asyncio.sleep(interval)
            ids = list(self._tasks)
            if not ids:
                continue
            held = await self.store.renew_leases(self.owner, ids, time.time() + self.lease)
            for run_id in ids:
                task = self._tasks.get(run_id)
                if task is None:
                    continue
                if run_id not in held:
                    log.warning("lost the lease on %s; stopping it here", run_id)
                    task.cancel()
                elif held[run_id]:
                    self._cancelling.setdefault(run_id, asyncio.Event()).set()
                    task.cancel()

    def _status_event(self, run_id: str) -> asyncio.Event:
        event = self._status_events.get(run_id)
        if event is None:
            event = self._status_events[run_id] = asyncio.Event()
        return event

    def _notify(self, run_id: str) -> None:
        event = self._status_events.pop(run_id, None)
        if event is not None:
            event.set()


def _mentions_kind(value: Any, kind: str) -> bool:
    """Whether any step nested anywhere in a dumped spec has this ``kind``."""
    if isinstance(value, dict):
        return value.get("kind") == kind or any(_mentions_kind(v, kind) for v in value.values())
    if isinstance(value, list):
        return any(_mentions_kind(v, kind) for v in value)
    return False


def parse_limits(text: str) -> dict[str, int]:
    """'agent=8,tool=32' -> {'agent': 8, 'tool': 32}; bad entries are a clear error."""
    limits: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, number = part.partition("=")
        if not number.strip().isdigit() or int(number) < 1:
            raise InvalidInputError(
                f"bad step limit {part!r}", hint="write KIND=N pairs, e.g. TOWER_STEP_LIMITS=agent=8,tool=32"
            )
        limits[kind.strip()] = int(number)
    return limits


def _normalise_input(value: Any) -> Any:
    if value is None:
        return {}
    try:
        text = dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"input is not JSON: {exc}") from None
    if len(text) > MAX_INPUT_BYTES:
        raise InvalidInputError(
            f"input is {len(text)} bytes; the limit is {MAX_INPUT_BYTES}",
            hint="store large documents elsewhere and pass a reference",
        )
    return json.loads(text)
