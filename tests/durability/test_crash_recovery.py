"""Crash recovery: SIGKILL an engine process mid-flight, recover in a fresh one, count executions.

A ``drive`` worker starts 20 runs of an 8-step chain (``dura_workload``) whose tool appends
``run_id step_key pid`` to a log (fsynced before it returns). The worker dies by SIGKILL:

- from outside, at a few delays after every run was created;
- from inside a step (the tool kills its own process after recording the execution);
- inside a store transaction, before COMMIT (``TOWER_FAULT_KILL_IN_COMMIT=N``).

Right after the kill, the test reads which step records the store holds (the committed
ones) and the log. A fresh ``recover`` worker then re-issues the same starts (idempotency
keys) and recovers every run. The proof:

- every run completes with the right output, and no run exists twice;
- each step of every run has a committed record and at least one execution;
- a step committed before the kill is never executed again (exactly one execution);
- a step not committed before the kill is executed exactly once more by the recovery,
  so it shows at most two executions in all (the one in flight when the process died).
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import dura_workload as wl
from .helpers import Worker, query, read_log, worker_env

pytestmark = pytest.mark.slow

RUNS = 20
SLEEP = 0.05  # per step; run idx sleeps SLEEP + 0.01 * (idx % 10): 0.4 s .. 1.1 s per run


@dataclass(frozen=True)
class Kill:
    after: float | None = None  # external SIGKILL this long after every run was created
    at_step: str | None = None  # "IDX:STEP_KEY": the tool kills its own process there
    in_commit: int | None = None  # TOWER_FAULT_KILL_IN_COMMIT


KILLS = [
    pytest.param(Kill(after=0.2), id="external-0.2s"),
    pytest.param(Kill(after=0.5), id="external-0.5s"),
    pytest.param(Kill(after=0.8), id="external-0.8s"),
    pytest.param(Kill(at_step="0:s1"), id="in-step-first"),
    pytest.param(Kill(at_step="7:s4"), id="in-step-middle"),
    pytest.param(Kill(at_step="19:s8"), id="in-step-last"),
    pytest.param(Kill(in_commit=5), id="in-commit-5"),
    pytest.param(Kill(in_commit=40), id="in-commit-40"),
    pytest.param(Kill(in_commit=100), id="in-commit-100"),
]


def _committed_steps(url: str) -> set[tuple[str, str]]:
    rows = query(url, "SELECT run_id, step_key FROM steps WHERE status = 'completed'")
    return {(row[0], row[1]) for row in rows}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kill", KILLS)
def test_sigkill_then_recover_runs_each_committed_step_once(
    kill: Kill, store_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "executions.log"
    extra = {"DURA_LOG": str(log)}
    if kill.at_step:
        extra["DURA_KILL_AT"] = kill.at_step
    if kill.in_commit:
        extra["TOWER_FAULT_KILL_IN_COMMIT"] = str(kill.in_commit)
    args = ["drive", store_url, "--runs", str(RUNS), "--sleep", str(SLEEP), "--lease", "0.5"]

    # 1. drive until the process dies by SIGKILL
    driver = Worker(args, worker_env(**extra), tmp_path / "drive.err")
    try:
        if kill.after is not None:
            driver.expect("started", timeout=20)
            time.sleep(kill.after)
            assert driver.proc.poll() is None, f"finished before the kill; {driver.describe()}"
            driver.proc.send_signal(signal.SIGKILL)
        code = driver.wait(timeout=30)
        assert code == -signal.SIGKILL, f"expected death by SIGKILL; {driver.describe()}"
        assert not any(line.startswith("done") for line in driver.rest()), "the driver finished"
    finally:
        driver.close()

    # 2. what survived the crash: committed step records, and executions logged so far
    committed = _committed_steps(store_url)
    before = read_log(log)
    for key in committed:
        assert before[key] == 1, f"committed step {key} executed {before[key]} times before the kill"
    assert len(committed) < RUNS * wl.STEPS, "the kill came after every step had been committed"

    # 3. a fresh process recovers every run
    recovery = Worker(
        ["recover", store_url, "--runs", str(RUNS), "--sleep", str(SLEEP), "--lease", "5"],
        worker_env(DURA_LOG=str(log)),
        tmp_path / "recover.err",
    )
    try:
        code = recovery.wait(timeout=40)
        out = recovery.rest()
        assert code == 0, recovery.describe()
    finally:
        recovery.close()
    report = json.loads(out[-1])

    # 4. every run completed once, with the right output
    assert sorted(map(int, report)) == list(range(RUNS))
    for idx, run in report.items():
        assert run["status"] == "completed", (idx, run)
        assert run["output"] == wl.expected_output(int(idx)), (idx, run)
    run_ids = {run["id"] for run in report.values()}
    rows = query(store_url, "SELECT id, status, owner FROM runs")
    assert len(rows) == RUNS, f"{len(rows)} runs in the store"
    assert {row[0] for row in rows} == run_ids
    assert all(row[1] == "completed" and row[2] is None for row in rows), rows

    # 5. the counter proof
    after = read_log(log)
    assert {run_id for run_id, _ in after} <= run_ids, "a step of an unknown run executed"
    final = _committed_steps(store_url)
    for run_id in run_ids:
        for step_key in wl.STEP_KEYS:
            key = (run_id, step_key)
            assert key in final, f"step {key} has no completed record"
            if key in committed:
                assert after[key] == 1, f"{key} was committed before the kill but ran {after[key]} times"
            else:
                assert after[key] - before[key] == 1, (
                    f"{key} was not committed before the kill; it ran {before[key]} times before "
                    f"and {after[key] - before[key]} times during recovery (expected exactly 1)"
                )
                assert after[key] <= 2
    redone = sum(1 for key, n in after.items() if n == 2)
    print(f"committed before the kill: {len(committed)}/{RUNS * wl.STEPS} steps; executed twice: {redone}")
    if kill.at_step:
        idx, step_key = kill.at_step.split(":")
        key = (report[idx]["id"], step_key)
        assert key not in committed
        assert (before[key], after[key]) == (1, 2), "the killing step ran once, then once in recovery"
