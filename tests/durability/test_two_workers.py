"""Two engine processes on one PostgreSQL store share the work and never duplicate it.

The test creates 60 pending, unowned runs (``execute=False``), then starts two ``work``
workers and releases them at the same moment. Each tool execution inserts
``(run_id, step_key, pid)`` into ``executions``; each run a worker finishes is recorded in
``finishes``. Leases (with heartbeats) must keep every run on one process at a time.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from controltower.engine import EmbeddedEngine

from . import dura_workload as wl
from .helpers import Worker, query, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

RUNS = 60
SLEEP = 0.02  # per step; run idx sleeps SLEEP + 0.01 * (idx % 10)

SIDE_TABLES = """
CREATE TABLE executions (run_id TEXT NOT NULL, step_key TEXT NOT NULL, pid INTEGER NOT NULL,
                         at DOUBLE PRECISION NOT NULL);
CREATE TABLE finishes (run_id TEXT NOT NULL, status TEXT NOT NULL, pid INTEGER NOT NULL);
"""


async def _create_pending_runs(url: str) -> dict[int, str]:
    engine = await EmbeddedEngine.open(url)
    try:
        spec = wl.build_spec()
        ids = {}
        for idx in range(RUNS):
            ids[idx] = await engine.start(
                spec,
                wl.run_input(idx, SLEEP + 0.01 * (idx % 10)),
                idempotency_key=wl.idempotency_key(idx),
                base_dir=str(wl.HERE),
                execute=False,
            )
        return ids
    finally:
        await engine.close()


@pytest.mark.timeout(60)
def test_two_workers_share_one_postgres_store_without_duplicates(pg_url: str, tmp_path: Path) -> None:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(SIDE_TABLES)
    ids = asyncio.run(_create_pending_runs(pg_url))
    statuses = query(pg_url, "SELECT status, owner FROM runs")
    assert len(statuses) == RUNS
    assert all(tuple(row) == ("pending", None) for row in statuses)

    env = worker_env(DURA_PG=pg_url)
    args = ["work", pg_url, "--lease", "2", "--max-active", "6", "--deadline", "30"]
    workers = [Worker(args, env, tmp_path / f"worker{i}.err", stdin=True) for i in range(2)]
    try:
        for worker in workers:
            worker.expect("ready", timeout=20)
        for worker in workers:  # release both at once
            worker.send("go\n")
        summaries = []
        for worker in workers:
            assert worker.wait(timeout=40) == 0, worker.describe()
            summaries.append(json.loads(worker.rest()[-1]))
    finally:
        for worker in workers:
            worker.close()
    pids = {worker.proc.pid for worker in workers}

    # every run completed, with the right output, finished exactly once
    runs = {row[0]: row for row in query(pg_url, "SELECT id, status, output, owner FROM runs")}
    assert set(runs) == set(ids.values())
    for idx, run_id in ids.items():
        _, status, output, owner = runs[run_id]
        assert status == "completed", runs[run_id]
        assert json.loads(output) == wl.expected_output(idx)
        assert owner is None
    finishes = query(pg_url, "SELECT run_id, status, pid FROM finishes")
    assert sorted(row[0] for row in finishes) == sorted(ids.values()), "a run finished twice or never"
    assert {row[1] for row in finishes} == {"completed"}

    # every step executed exactly once, and each run stayed on one process
    executions = query(pg_url, "SELECT run_id, step_key, pid FROM executions")
    seen: dict[tuple[str, str], list[int]] = {}
    for run_id, step_key, pid in executions:
        seen.setdefault((run_id, step_key), []).append(pid)
    twice = {key: who for key, who in seen.items() if len(who) > 1}
    assert not twice, f"steps executed more than once: {twice}"
    assert set(seen) == {(run_id, key) for run_id in ids.values() for key in wl.STEP_KEYS}
    finisher = {row[0]: row[2] for row in finishes}
    for run_id in ids.values():
        assert {seen[(run_id, key)][0] for key in wl.STEP_KEYS} == {finisher[run_id]}, run_id

    # both processes did part of the work
    per_pid = {pid: sum(1 for row in finishes if row[2] == pid) for pid in pids}
    assert all(count > 0 for count in per_pid.values()), f"runs finished per process: {per_pid}"
    assert sum(s["finished"] for s in summaries) == RUNS
    print(f"runs finished per worker process: {per_pid}")
