"""Worker subprocess for the gateway crash-replay tests: ``python gate_worker.py MODE URL POLICY [options]``.

Every process opens an engine on the shared store, a gateway on the same store with the
policy read from the file POLICY (``open_gateway(engine.store, policy_texts=...)``), plugs it
in with ``GovernedToolGate`` and registers the registry tools of ``wf.crash_impls``.

Modes:

- ``start --kind KIND --tag TAG``: start a run of ``crash_impls.build_spec(KIND)`` and drive
  it here; prints ``started RUN_ID``, then ``status STATUS`` once the run parks or finishes.
- ``work [--run RUN_ID]``: without ``--run``, prints ``ready`` once its engine and gateway are
  open and reads RUN_ID from stdin (so the tests start workers ahead of time). Then runs
  ``engine.work()`` (which claims the run once it is woken, or once its previous owner's
  lease ran out) until RUN_ID is finished, and prints ``done {status, output, error}``.

``--lease`` is the engine's lease (short, so a killed owner's runs are taken over quickly).
Fault injection: ``GATE_FAULT=kill_after_complete`` SIGKILLs this process right after the
gateway has recorded a tool call as completed (its result and "executed" audit record
committed), before the engine saves the step. ``TOWER_TEST_HANG`` makes the tools hang
after their side effect.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from wf import crash_impls

from controltower.engine import EmbeddedEngine
from controltower.gateway.engine_gate import GovernedToolGate
from controltower.gateway.pipeline import ToolGateway, open_gateway
from controltower.store import TERMINAL


def say(text: str) -> None:
    print(text, flush=True)


def inject_faults(gateway: ToolGateway) -> None:
    fault = os.environ.get("GATE_FAULT")
    if not fault:
        return
    if fault != "kill_after_complete":
        raise SystemExit(f"unknown GATE_FAULT {fault!r}")
    publish = gateway.audit.publish

    async def publish_then_die(records: Any) -> None:
        # the result and its "executed" audit record have just committed together
        records = list(records)
        await publish(records)
        if any(r.kind == "tool_call" and r.outcome == "executed" for r in records):
            os.kill(os.getpid(), signal.SIGKILL)

    gateway.audit.publish = publish_then_die  # type: ignore[method-assign]


async def open_governed(args: argparse.Namespace) -> EmbeddedEngine:
    engine = await EmbeddedEngine.open(args.url, lease=args.lease, poll_interval=0.05)
    policy = Path(args.policy)
    gateway = await open_gateway(engine.store, policy_texts={policy.name: policy.read_text()})
    for tool in crash_impls.registry_tools():
        await gateway.registry.register(tool)
    inject_faults(gateway)
    engine.tool_gate = GovernedToolGate(gateway)
    return engine


async def start(args: argparse.Namespace) -> None:
    engine = await open_governed(args)
    try:
        spec = crash_impls.build_spec(args.kind)
        run_id = await engine.start(spec, crash_impls.run_input(args.tag), base_dir=str(crash_impls.HERE))
        say(f"started {run_id}")
        run = await engine.wait(run_id, statuses=("waiting", *TERMINAL), timeout=args.deadline)
        await engine.drain()
        say(f"status {run.status}")
    finally:
        await engine.close()


async def work(args: argparse.Namespace) -> None:
    engine = await open_governed(args)
    try:
        run_id = args.run
        if run_id is None:
            say("ready")
            run_id = (await asyncio.to_thread(sys.stdin.readline)).strip()
        stop = asyncio.Event()
        loop = asyncio.create_task(engine.work(stop))
        try:
            run = await engine.wait(run_id, timeout=args.deadline)
        finally:
            stop.set()
            await loop
        await engine.drain()
        say("done " + json.dumps({"status": run.status, "output": run.output, "error": run.error}))
    finally:
        await engine.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["start", "work"])
    parser.add_argument("url")
    parser.add_argument("policy")
    parser.add_argument("--kind", default="pay")
    parser.add_argument("--tag", default="t")
    parser.add_argument("--run")
    parser.add_argument("--lease", type=float, default=0.5)
    parser.add_argument("--deadline", type=float, default=30.0)
    args = parser.parse_args()
    asyncio.run({"start": start, "work": work}[args.mode](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
