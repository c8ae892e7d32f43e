"""The workload shared by the durability tests and their worker subprocesses.

Imported two ways: as ``durability.dura_workload`` by the tests and as the top-level
module ``dura_workload`` inside worker processes (whose ``sys.path[0]`` is this folder,
which is also the workflow's ``base_dir``, so the tool ``dura_workload:step`` resolves).
Keep it free of relative imports.

The tool is the side effect whose executions the tests count. Where it records them:

- ``DURA_LOG=PATH``: appends ``run_id step_key pid`` to PATH, fsynced before returning;
- ``DURA_PG=URL``: inserts ``(run_id, step_key, pid)`` into the ``executions`` table.

``DURA_KILL_AT=IDX:STEP_KEY`` makes the tool SIGKILL its own process at that step of the
run whose input ``idx`` is IDX, after recording the execution and before returning.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

from controltower.spec.models import WorkflowSpec

HERE = Path(__file__).resolve().parent
WORKFLOW = "durability_chain"
STEPS = 8
STEP_KEYS = [f"s{k}" for k in range(1, STEPS + 1)]

_pg: Any = None


def build_spec() -> WorkflowSpec:
    """Eight sequential tool steps; each folds its index into an accumulator (order matters)."""
    steps: list[dict[str, Any]] = []
    for k in range(1, STEPS + 1):
        acc = "${{ input.seed }}" if k == 1 else f"${{{{ steps.s{k - 1}.output.acc }}}}"
        steps.append(
            {
                "id": f"s{k}",
                "kind": "tool",
                "tool": "chain",
                "input": {"idx": "${{ input.idx }}", "k": k, "acc": acc, "sleep": "${{ input.sleep }}"},
            }
        )
    return WorkflowSpec.model_validate(
        {
            "name": WORKFLOW,
            "tools": {"chain": {"impl": "dura_workload:step", "side_effect": "write"}},
            "steps": steps,
            "output": {"idx": "${{ input.idx }}", "acc": f"${{{{ steps.s{STEPS}.output.acc }}}}"},
        }
    )


def run_input(idx: int, sleep: float) -> dict[str, Any]:
    return {"idx": idx, "seed": idx * 7 + 1, "sleep": sleep}


def expected_output(idx: int) -> dict[str, Any]:
    acc = idx * 7 + 1
    for k in range(1, STEPS + 1):
        acc = (acc * 3 + k) % 1_000_003
    return {"idx": idx, "acc": acc}


def idempotency_key(idx: int) -> str:
    return f"dura-{idx}"


async def step(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    await asyncio.sleep(float(payload["sleep"]))
    pid = os.getpid()
    log = os.environ.get("DURA_LOG")
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{ctx.run_id} {ctx.step_key} {pid}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    pg = os.environ.get("DURA_PG")
    if pg:
        pg_execute(
            pg,
            "INSERT INTO executions (run_id, step_key, pid, at) VALUES (%s, %s, %s, %s)",
            (ctx.run_id, ctx.step_key, pid, time.time()),
        )
    if os.environ.get("DURA_KILL_AT") == f"{payload['idx']}:{ctx.step_key}":
        os.kill(pid, signal.SIGKILL)
    return {"acc": (int(payload["acc"]) * 3 + int(payload["k"])) % 1_000_003}


def pg_execute(url: str, sql: str, params: tuple[Any, ...]) -> None:
    """Run one statement on this process's autocommit connection (opened on first use)."""
    global _pg
    if _pg is None:
        import psycopg

        _pg = psycopg.connect(url, autocommit=True)
    _pg.execute(sql, params)
