"""How runs and steps look in a terminal (rich), and live progress while one runs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from typing import Any

from rich import box
from rich.console import Group
from rich.markup import escape as _escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from controltower.engine import EmbeddedEngine
from controltower.store import RunRecord, StepRecord, WorkflowRecord

STATUS_STYLE = {
    "completed": "green",
    "failed": "red",
    "cancelled": "magenta",
    "waiting": "yellow",
    "running": "cyan",
    "pending": "blue",
    "retrying": "yellow",
}


def escape(text: str) -> str:
    return _escape(text)


def when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def duration(start: float | None, end: float | None) -> str:
    if start is None or end is None:
        return "-"
    seconds = max(0.0, end - start)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def brief(value: Any, limit: int = 60) -> str:
    if value is None:
        return ""
    text = json.dumps(value, default=str, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def status(text: str) -> Text:
    return Text(text, style=STATUS_STYLE.get(text, ""))


def workflows_table(records: Iterable[WorkflowRecord]) -> Table:
    table = Table("workflow", "version", "digest", "published", "steps", title="Workflows")
    for r in records:
        table.add_row(
            r.name,
            str(r.version),
            r.digest[:12],
            when(r.created_at),
            str(len(r.spec.get("steps", []))),
        )
    return table


def runs_table(records: Iterable[RunRecord]) -> Table:
    table = Table(title="Runs", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    # the id is what users copy into `tower show`: never truncate it, let the notes wrap instead
    table.add_column("run", no_wrap=True, min_width=30)
    table.add_column("workflow", min_width=16, overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("started", no_wrap=True)
    table.add_column("duration", no_wrap=True)
    table.add_column("waiting on / error", overflow="fold")
    today = time.strftime("%Y-%m-%d")
    for r in records:
        note = r.waiting_on or ((r.error or {}).get("message") or "")
        table.add_row(
            r.id,
            f"{r.workflow}@{r.version}",
            status(r.status),
            when(r.created_at).removeprefix(today + " "),  # today's runs: the time is enough
            duration(r.created_at, r.finished_at),
            escape(brief(note, 50) if not isinstance(note, str) else note[:50]),
        )
    return table


def run_summary(r: RunRecord) -> Group:
    lines = [
        Text.assemble("run ", (r.id, "bold"), f"  {r.workflow}@{r.version}  ", status(r.status)),
        Text(
            f"started {when(r.created_at)}  duration {duration(r.created_at, r.finished_at or time.time())}"
        ),
    ]
    if r.waiting_on:
        lines.append(Text(f"waiting on {r.waiting_on}", style="yellow"))
        for part in r.waiting_on.split(", "):
            kind, _, key = part.partition(":")
            if kind == "approval":
                lines.append(
                    Text(f"  decide: tower approve {r.id} {key}   (or: tower reject ... --reason ...)")
                )
            elif kind == "tool_approval":
                lines.append(Text(f"  a governed tool call at {key} needs approval: tower approvals"))
            elif kind == "event":
                lines.append(Text(f"  send:   tower signal {r.id} EVENT --data '{{...}}'"))
    if r.error:
        where = f" at {r.error['step']}" if r.error.get("step") else ""
        lines.append(Text(f"error{where}: {r.error.get('message')}", style="red"))
        if r.status == "failed":
            lines.append(Text(f"  retry from the failed step: tower resume {r.id}"))
    if r.status == "completed":
        lines.append(Text(f"output: {brief(r.output, 400)}"))
    lines.append(Text(f"details: tower show {r.id}", style="dim"))
    return Group(*lines)


def timeline(steps: dict[str, StepRecord]) -> Table:
    table = Table("step", "kind", "status", "tries", "duration", "input", "output / error", title="Timeline")
    for s in sorted(steps.values(), key=lambda s: (s.started_at, s.finished_at or float("inf"))):
        result = brief(s.error.get("message") if s.error else s.output, 60)
        table.add_row(
            s.step_key,
            s.kind,
            status(s.status),
            str(s.attempts),
            duration(s.started_at, s.finished_at),
            escape(brief(s.input, 40)),
            escape(result),
        )
    return table


def run_json(r: RunRecord, steps: dict[str, StepRecord] | None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": r.id,
        "workflow": r.workflow,
        "version": r.version,
        "status": r.status,
        "input": r.input,
        "output": r.output,
        "error": r.error,
        "waiting_on": r.waiting_on,
        "created_at": r.created_at,
        "finished_at": r.finished_at,
    }
    if steps is not None:
        data["steps"] = [
            {
                "key": s.step_key,
                "id": s.step_id,
                "kind": s.kind,
                "status": s.status,
                "attempts": s.attempts,
                "started_at": s.started_at,
                "finished_at": s.finished_at,
                "input": s.input,
                "output": s.output,
                "error": s.error,
            }
            for s in sorted(steps.values(), key=lambda s: s.started_at)
        ]
    return data


async def watch(
    engine: EmbeddedEngine, run_id: str, statuses: frozenset[str], *, quiet: bool = False
) -> RunRecord:
    """Wait for the run to reach ``statuses``, showing live progress on a terminal."""
    if quiet:
        return await engine.wait(run_id, statuses=statuses)
    waiter = asyncio.ensure_future(engine.wait(run_id, statuses=statuses))
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True
    ) as progress:
        task = progress.add_task(f"{run_id} running", total=None)
        while not waiter.done():
            await asyncio.wait({waiter}, timeout=0.25)
            if not waiter.done():
                steps = await engine.store.load_steps(run_id)
                done = sum(1 for s in steps.values() if s.status == "completed")
                latest = max(steps.values(), key=lambda s: s.started_at).step_key if steps else "-"
                progress.update(task, description=f"{run_id}: {done} steps done, at {latest}")
    return waiter.result()
