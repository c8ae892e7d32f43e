"""Crash replay through the gateway: approvals and tool calls survive SIGKILL without double execution.

Engine processes (``gate_worker.py``) share one store and one policy file; the tools append
one fsynced line per execution to a ledger file (``wf.crash_impls``), so executions are
counted across killed processes. The test process opens its own engine and gateway on the
same store to decide approvals, read the call log and reconcile, like an operator would.

1. A payment parks on an approval (process A exits); the test approves; process B pays and
   hangs (a payment API that never answers) and is SIGKILLed. Process C finds the call in
   doubt: the step fails with ``in_doubt`` and nothing is paid again. An operator records
   what really happened and resumes the run: it completes with the recorded result.
2. The payment completes and the gateway records its result, then process B dies before the
   engine saves the step (a fault hook SIGKILLs it right after ``CallLog.complete``): the
   recovery replays the recorded result, nothing is paid again.
3. A registry tool declared idempotent that was killed mid-call is run again on recovery,
   with the same idempotency key; the same tool without the tag is in doubt instead.
4. An approval authorises one call: a second call with the same arguments but another call
   key needs (and gets) its own approval. (In-process: no crash involved.)

In 2 and 3 the test process itself is the recovering process (it starts no engine loop of
its own before the crash), which saves two interpreter start-ups per test. Workers that
must be ready at a given moment are started ahead of time and handed their run on stdin.
Two tests pin bugs found here and since fixed: an executed call lost from the audit trail by a
crash, and an in-doubt error that did not name the call key to reconcile.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.durability.helpers import PromptProc

from controltower.engine import EmbeddedEngine
from controltower.gateway.approvals import ApprovalRequest, Approver
from controltower.gateway.engine_gate import GovernedToolGate
from controltower.gateway.pipeline import ToolCallRequest, ToolGateway, open_gateway
from controltower.gateway.tools import args_digest
from controltower.spec.errors import ConflictError
from controltower.store import RunRecord

from .wf import crash_impls

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

WORKER = Path(__file__).with_name("gate_worker.py")
FINANCE = Approver("fiona", groups=("finance",))
_NOT_INHERITED = ("TOWER_FAULT_KILL_IN_COMMIT", "TOWER_DB_URL", "GATE_FAULT", crash_impls.HANG_ENV)


class Proc(PromptProc):
    """A gate_worker.py subprocess whose stdout lines can be awaited by prefix."""

    def __init__(self, args: list[str], env: dict[str, str], stderr: Path) -> None:
        super().__init__(WORKER, args, env, stderr)


@dataclass
class Tower:
    """The test process's view of the shared store: an engine, its gateway, and the workers."""

    url: str
    tmp: Path
    policy: Path
    engine: EmbeddedEngine
    gateway: ToolGateway
    procs: list[Proc]

    def spawn(self, name: str, mode: str, *args: str, **env: str) -> Proc:
        """Start ``gate_worker.py MODE URL POLICY ARGS`` with ``env`` on top of ours."""
        base = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
        proc = Proc([mode, self.url, str(self.policy), *args], {**base, **env}, self.tmp / f"{name}.err")
        self.procs.append(proc)
        return proc


@pytest.fixture
async def tower(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Tower]:
    monkeypatch.setenv("TOWER_TEST_LEDGER", str(tmp_path / "ledger"))
    for name in _NOT_INHERITED:
        monkeypatch.delenv(name, raising=False)
    policy = tmp_path / "payments.cedar"
    policy.write_text(crash_impls.POLICY)
    engine = await EmbeddedEngine.open(store_url, poll_interval=0.05)
    gateway = await open_gateway(engine.store, policy_texts={policy.name: policy.read_text()})
    for tool in crash_impls.registry_tools():
        await gateway.registry.register(tool)
    engine.tool_gate = GovernedToolGate(gateway)
    tower = Tower(store_url, tmp_path, policy, engine, gateway, [])
    try:
        yield tower
    finally:
        for proc in tower.procs:  # every worker dies here, whatever the test did
            if proc.proc.poll() is None:
                proc.proc.kill()
        for proc in tower.procs:
            proc.close()
        await engine.close()


async def until(check: Callable[[], bool], what: str, proc: Proc | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"worker exited while waiting for {what}; {proc.describe()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f"; {proc.describe()}" if proc else ""))
        await asyncio.sleep(0.02)


def paid(tag: str) -> list[tuple[int, str, int]]:
    return crash_impls.entries(tag, "pay")


def charged(tag: str) -> list[tuple[int, str, int]]:
    return crash_impls.entries(tag, "charge")


async def approve(tower: Tower, run_id: str, tag: str) -> ApprovalRequest:
    """The run waits on the approval of its payment: check it, and approve it as finance."""
    (request,) = await tower.gateway.approvals.list(run_id=run_id)
    assert (request.tool, request.approval_group, request.step_key) == ("payments.pay", "finance", "pay")
    assert request.call_key == f"default/{run_id}/pay/0"
    assert paid(tag) == [], "nothing is paid before the approval"
    decided = await tower.gateway.decide(request.id, approver=FINANCE, approve=True)
    assert decided.status == "approved"
    return decided


async def park_elsewhere(tower: Tower, tag: str) -> tuple[str, ApprovalRequest]:
    """Process A starts a payment run, which parks on its approval; A exits; the test approves."""
    a = tower.spawn("a-start", "start", "--kind", "pay", "--tag", tag)
    run_id = a.expect("started")
    assert a.expect("status") == "waiting"
    assert a.wait() == 0, a.describe()
    return run_id, await approve(tower, run_id, tag)


async def park_here(tower: Tower, tag: str) -> tuple[str, ApprovalRequest]:
    """The test process starts a payment run, which parks on its approval; the test approves."""
    spec = crash_impls.build_spec("pay")
    run_id = await tower.engine.start(spec, crash_impls.run_input(tag), base_dir=str(crash_impls.HERE))
    run = await tower.engine.wait(run_id, statuses=("waiting",), timeout=10)
    assert run.owner is None, "a parked run is nobody's"
    return run_id, await approve(tower, run_id, tag)


async def recover_here(tower: Tower, run_id: str, timeout: float = 20) -> RunRecord:
    """Recovery in the test process: take the run over once its dead owner's lease ran out."""
    deadline = time.monotonic() + timeout
    while not await tower.engine.recover():
        assert time.monotonic() < deadline, f"run {run_id} was never free to recover"
        await asyncio.sleep(0.05)
    return await tower.engine.wait(run_id, timeout=timeout)


def hand_over(proc: Proc, run_id: str) -> None:
    """Give a standby ``work`` process (started ahead of time, to overlap start-up) its run."""
    proc.expect("ready")
    proc.send(run_id)


async def test_an_in_doubt_payment_is_not_rerun_and_resumes_with_the_reconciled_result(
    tower: Tower,
) -> None:
    tag = uuid.uuid4().hex
    b = tower.spawn("b-work", "work", **{crash_impls.HANG_ENV: "60"})
    c = tower.spawn("c-work", "work")
    run_id, approval = await park_elsewhere(tower, tag)

    # B takes the woken run, pays, and hangs waiting for the PSP: SIGKILL once the money moved
    hand_over(b, run_id)
    await until(lambda: len(paid(tag)) == 1, "process B to pay", b)
    b.kill()
    assert b.proc.returncode == -signal.SIGKILL
    record = await tower.gateway.calls.get(approval.call_key)
    assert record is not None
    assert (record.status, record.tool) == ("started", "payments.pay")
    assert (await tower.gateway.approvals.get(approval.id)).consumed_at is not None

    # C recovers the run once B's lease ran out: the call is in doubt, so the step fails
    hand_over(c, run_id)
    done = json.loads(c.expect("done"))
    assert c.wait() == 0, c.describe()
    assert done["status"] == "failed", done
    assert (done["error"]["code"], done["error"]["step"]) == ("in_doubt", "pay"), done
    assert len(paid(tag)) == 1, "the in-doubt payment ran again"
    record = await tower.gateway.calls.get(approval.call_key)
    assert record is not None
    assert record.status == "started"

    # an operator checks with the PSP, records what happened, and resumes the run
    reconciled = {"paid": 1250, "invoice": f"INV-{tag[:6]}", "by": "operator", "psp_ref": "PSP-7"}
    await tower.gateway.calls.resolve_in_doubt(approval.call_key, result=reconciled)
    await tower.engine.resume(run_id)
    run = await tower.engine.wait(run_id, timeout=20)
    assert run.status == "completed", run.error
    assert run.output == {"paid": reconciled}
    steps = await tower.engine.store.load_steps(run_id)
    assert (steps["pay"].status, steps["pay"].output) == ("completed", reconciled)

    assert paid(tag) == [(b.proc.pid, approval.call_key, 1250)]
    assert await tower.gateway.approvals.list(run_id=run_id, status=None) == [
        await tower.gateway.approvals.get(approval.id)
    ], "resuming asked for no second approval"
    assert (await tower.gateway.audit.verify()).ok


async def crash_after_recording(tower: Tower, tag: str) -> tuple[str, ApprovalRequest]:
    """Scenario 2 up to the crash: B pays, the gateway records the result, and B dies before
    the engine saves the step."""
    b = tower.spawn("b-work", "work", GATE_FAULT="kill_after_complete")
    run_id, approval = await park_here(tower, tag)
    hand_over(b, run_id)
    assert b.wait() == -signal.SIGKILL, b.describe()
    record = await tower.gateway.calls.get(approval.call_key)
    assert record is not None
    assert (record.status, record.result) == ("completed", from_tool(tag))
    steps = await tower.engine.store.load_steps(run_id)
    assert steps["pay"].status == "waiting", "the fault came too late: the step was saved"
    assert paid(tag) == [(b.proc.pid, approval.call_key, 1250)]
    return run_id, approval


def from_tool(tag: str) -> dict[str, Any]:
    return {"paid": 1250, "invoice": f"INV-{tag[:6]}", "by": "tool"}


async def test_a_recorded_result_is_replayed_when_the_process_dies_before_the_step_is_saved(
    tower: Tower,
) -> None:
    tag = uuid.uuid4().hex
    run_id, approval = await crash_after_recording(tower, tag)

    # the test process recovers the run: the step replays the recorded result, pays nothing
    run = await recover_here(tower, run_id)
    assert run.status == "completed", run.error
    assert run.output == {"paid": from_tool(tag)}
    assert len(paid(tag)) == 1, "the recorded payment ran again"
    steps = await tower.engine.store.load_steps(run_id)
    assert (steps["pay"].status, steps["pay"].output) == ("completed", from_tool(tag))
    assert await tower.gateway.approvals.list(run_id=run_id, status=None) == [
        await tower.gateway.approvals.get(approval.id)
    ], "the replay asked for no second approval"


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_call_recorded_just_before_a_crash_is_still_in_the_audit_trail(tower: Tower) -> None:
    tag = uuid.uuid4().hex
    run_id, approval = await crash_after_recording(tower, tag)
    assert (await recover_here(tower, run_id)).status == "completed"
    assert len(paid(tag)) == 1
    calls = await tower.gateway.audit.query("default", run_id=run_id, kind="tool_call")
    executed = [r for r in calls if r.outcome == "executed"]
    assert [r.data.get("approval_id") for r in executed] == [approval.id], [
        (r.outcome, r.reason) for r in calls
    ]


@pytest.mark.parametrize(
    ("kind", "rerun"),
    [pytest.param("charge", True, id="idempotent"), pytest.param("charge_plain", False, id="plain")],
)
async def test_only_an_idempotent_tool_killed_mid_call_runs_again_with_the_same_key(
    tower: Tower, kind: str, rerun: bool
) -> None:
    tag = uuid.uuid4().hex
    # B starts the run; the charge reaches the PSP and hangs: SIGKILL
    b = tower.spawn("b-start", "start", "--kind", kind, "--tag", tag, **{crash_impls.HANG_ENV: "60"})
    run_id = b.expect("started")
    await until(lambda: len(charged(tag)) == 1, "process B to charge", b)
    b.kill()
    call_key = f"default/{run_id}/charge/0"
    record = await tower.gateway.calls.get(call_key)
    assert record is not None
    assert (record.status, record.tool) == ("started", f"psp.{kind}")

    # the test process recovers the run
    run = await recover_here(tower, run_id)
    record = await tower.gateway.calls.get(call_key)
    assert record is not None
    lines = charged(tag)
    if rerun:
        assert run.status == "completed", run.error
        assert run.output == {"charged": {"charged": 1250, "key": call_key}}
        # run again, by another process, with the same idempotency key: the PSP de-duplicates
        assert lines == [(b.proc.pid, call_key, 1250), (os.getpid(), call_key, 1250)]
        assert record.status == "completed"
    else:
        assert run.status == "failed"
        assert run.error is not None
        assert (run.error["code"], run.error["step"]) == ("in_doubt", "charge"), run.error
        assert lines == [(b.proc.pid, call_key, 1250)]
        assert record.status == "started"


async def test_an_in_doubt_error_names_the_call_key_to_reconcile(tower: Tower) -> None:
    engine, gateway = tower.engine, tower.gateway
    tag = uuid.uuid4().hex
    payload = {"tag": tag, "amount_cents": 1250}
    run_id = await engine.start(
        crash_impls.build_spec("charge_plain"),
        crash_impls.run_input(tag),
        base_dir=str(crash_impls.HERE),
        execute=False,
    )
    # the state a process killed mid-call leaves behind: the call started, never finished
    key = f"default/{run_id}/charge/0"
    tool = await gateway.registry.resolve("psp.charge_plain")
    claim = await gateway.calls.claim(
        key,
        tenant="default",
        tool=tool.name,
        version=tool.version,
        digest=args_digest(tool.name, tool.version, payload),
        run_id=run_id,
        step_key="charge",
        retry_in_doubt=False,
    )
    assert claim.outcome == "claimed"
    assert await engine.wake(run_id)
    run = await engine.wait(run_id, timeout=10)
    assert run.status == "failed"
    assert run.error is not None
    assert run.error["code"] == "in_doubt"
    assert charged(tag) == []
    assert key in json.dumps(run.error), run.error


async def test_an_approval_authorises_one_call_only(tower: Tower) -> None:
    engine, gateway = tower.engine, tower.gateway
    tag = uuid.uuid4().hex
    run_id = await engine.start(
        crash_impls.build_spec("pay_twice"), crash_impls.run_input(tag), base_dir=str(crash_impls.HERE)
    )
    await engine.wait(run_id, statuses=("waiting",), timeout=10)
    (first,) = await gateway.approvals.list(run_id=run_id)
    assert first.step_key == "pay1"
    first = await gateway.decide(first.id, approver=FINANCE, approve=True)
    with pytest.raises(ConflictError):
        await gateway.decide(first.id, approver=FINANCE, approve=True)
    assert await engine.wake(run_id)
    await engine.wait(run_id, statuses=("waiting",), timeout=10)

    # pay1 ran once and used its approval; pay2 has the same arguments but waits for its own
    assert [key for _, key, _ in paid(tag)] == [first.call_key]
    first = await gateway.approvals.get(first.id)
    assert first.consumed_at is not None
    pending = await gateway.approvals.list(run_id=run_id)
    assert [(a.step_key, a.status) for a in pending] == [("pay2", "pending")]
    second = pending[0]
    assert second.id != first.id
    assert second.call_key != first.call_key
    assert (second.args, second.digest) == (first.args, first.digest)

    # the same arguments under yet another call key: pending, authorised by neither approval
    result = await gateway.call(
        ToolCallRequest(
            tool=first.tool,
            version=first.tool_version,
            args=first.args,
            workflow=crash_impls.WORKFLOW,
            run_id=run_id,
            step_key="pay3",
        )
    )
    assert result.status == "pending_approval", result
    assert result.approval_id not in (first.id, second.id)
    # a consumed approval cannot start another call, even one that names it explicitly
    assert first.approved_digest == args_digest(first.tool, first.tool_version, first.args)
    claim = await gateway.calls.claim(
        "default/forged/pay/0",
        tenant="default",
        tool=first.tool,
        version=first.tool_version,
        digest=first.digest,
        run_id=run_id,
        step_key="forged",
        retry_in_doubt=False,
        approval=(first.call_key, first.approved_digest),
    )
    assert claim.outcome == "approval_used"
    assert await gateway.calls.get("default/forged/pay/0") is None
    assert len(paid(tag)) == 1

    # approving pay2 pays again, under pay2's own key
    await gateway.decide(second.id, approver=FINANCE, approve=True)
    assert await engine.wake(run_id)
    run = await engine.wait(run_id, timeout=10)
    assert run.status == "completed", run.error
    assert [key for _, key, _ in paid(tag)] == [first.call_key, second.call_key]
    assert (await gateway.approvals.get(second.id)).consumed_at is not None
