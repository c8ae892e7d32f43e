"""Worker subprocess for the durability tests: ``python worker.py MODE URL [options]``.

Modes:

- ``drive``: start ``--runs`` runs (idempotency keys ``dura-IDX``) and drive them here with
  a short lease; prints ``started`` once every run exists, ``done`` when all finished.
  The tests SIGKILL it somewhere in between (or it kills itself: DURA_KILL_AT,
  TOWER_FAULT_KILL_IN_COMMIT).
- ``recover``: a fresh engine on the same store: (re)start the same runs by idempotency key
  (creating any the killed process never committed), then ``recover()`` until every run
  is terminal; prints one JSON object ``{idx: {id, status, output, error}}``.
- ``work``: prints ``ready``, waits for a line on stdin, then runs ``engine.work()`` until
  no active run remains in the store (or ``--deadline``); prints a JSON summary.
  Each finished run is recorded in the ``finishes`` table (run_id, status, pid).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import dura_workload as wl

from controltower.engine import EmbeddedEngine
from controltower.store import ACTIVE, TERMINAL, RunFilter, RunRecord


async def _start_all(engine: EmbeddedEngine, runs: int, sleep: float, execute: bool) -> dict[int, str]:
    spec = wl.build_spec()
    ids = {}
    for idx in range(runs):
        ids[idx] = await engine.start(
            spec,
            wl.run_input(idx, sleep + 0.01 * (idx % 10)),
            idempotency_key=wl.idempotency_key(idx),
            base_dir=str(wl.HERE),
            execute=execute,
        )
    return ids


async def drive(args: argparse.Namespace) -> int:
    engine = await EmbeddedEngine.open(args.url, lease=args.lease, poll_interval=0.05)
    try:
        ids = await _start_all(engine, args.runs, args.sleep, execute=True)
        print("started", flush=True)
        for run_id in ids.values():
            await engine.wait(run_id, timeout=args.deadline)
        print("done", engine.store.commits, flush=True)
    finally:
        await engine.close()
    return 0


async def recover(args: argparse.Namespace) -> int:
    engine = await EmbeddedEngine.open(args.url, lease=args.lease, poll_interval=0.05)
    try:
        ids = await _start_all(engine, args.runs, args.sleep, execute=False)
        deadline = time.monotonic() + args.deadline
        runs: dict[int, RunRecord] = {}
        while True:
            await engine.recover()
            runs = {idx: await engine.get(run_id) for idx, run_id in ids.items()}
            if all(run.status in TERMINAL for run in runs.values()):
                break
            if time.monotonic() > deadline:
                pending = {idx: run.status for idx, run in runs.items() if run.status not in TERMINAL}
                print(f"recovery timed out; not terminal: {pending}", file=sys.stderr, flush=True)
                return 3
            await asyncio.sleep(0.05)
        await engine.drain()
        report = {
            str(idx): {"id": run.id, "status": run.status, "output": run.output, "error": run.error}
            for idx, run in runs.items()
        }
        print(json.dumps(report), flush=True)
    finally:
        await engine.close()
    return 0


class _RecordingEngine(EmbeddedEngine):
    """Records every run this process finishes, after the status is committed."""

    finished: int = 0

    async def _finish(self, run: RunRecord, status: str, **kw: Any) -> None:
        await super()._finish(run, status, **kw)
        self.finished += 1
        wl.pg_execute(
            os.environ["DURA_PG"],
            "INSERT INTO finishes (run_id, status, pid) VALUES (%s, %s, %s)",
            (run.id, status, os.getpid()),
        )


async def work(args: argparse.Namespace) -> int:
    engine = await _RecordingEngine.open(args.url, lease=args.lease, poll_interval=0.05)
    try:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        stop = asyncio.Event()
        loop = asyncio.create_task(engine.work(stop, max_active=args.max_active))
        deadline = time.monotonic() + args.deadline
        timed_out = False
        while not loop.done():
            await asyncio.sleep(0.1)
            if not await engine.store.list_runs(RunFilter(status=sorted(ACTIVE), limit=1)):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
        stop.set()
        await loop
        await engine.drain()
        print(json.dumps({"pid": os.getpid(), "finished": engine.finished}), flush=True)
    finally:
        await engine.close()
    return 3 if timed_out else 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["drive", "recover", "work"])
    parser.add_argument("url")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--sleep", type=float, default=0.05)
    parser.add_argument("--lease", type=float, default=0.5)
    parser.add_argument("--max-active", type=int, default=6)
    parser.add_argument("--deadline", type=float, default=30.0)
    args = parser.parse_args()
    return int(asyncio.run({"drive": drive, "recover": recover, "work": work}[args.mode](args)))


if __name__ == "__main__":
    sys.exit(main())
