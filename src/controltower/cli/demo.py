"""`tower demo`: the support-triage template over sample tickets, end to end, offline."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from controltower.engine import EmbeddedEngine
from controltower.observability import compute_kpis
from controltower.store import TERMINAL, RunRecord

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
AUTO_APPROVER = "auto-approver (demo mode)"


async def run_demo(db: str | None, count: int, out: Console, *, decide: bool = True) -> dict[str, Any]:
    from controltower.spec.loader import load_spec_file

    folder = TEMPLATES / "support_triage"
    spec = load_spec_file(folder / "workflow.yaml")
    tickets: list[dict[str, Any]] = json.loads((folder / "tickets.json").read_text())[:count]
    tickets.append(dict(tickets[0]))  # a duplicate delivery: the idempotency key dedupes it
    session = time.strftime("%Y%m%d%H%M%S")
    engine = await EmbeddedEngine.open(db)
    try:
        from controltower.gateway.engine_gate import GovernedToolGate
        from controltower.gateway.pipeline import open_gateway

        gateway = await open_gateway(engine.store, policies=str(folder / "policies"))
        engine.tool_gate = GovernedToolGate(gateway)
        out.print(
            f"[bold]Control Tower demo[/bold]: workflow [cyan]{spec.name}[/cyan] over {len(tickets)} "
            f"tickets, store {engine.store.url}"
        )
        out.print(
            "[dim]Every tool call passes the governed gateway "
            f"(Cedar policies in {folder / 'policies'}).[/dim]"
        )
        out.print("[dim]No model configured: the agents are rule-based and heuristic (offline mode).[/dim]")
        started = time.monotonic()
        ids = await asyncio.gather(
            *[
                engine.start(spec, t, idempotency_key=f"demo-{session}:{t['id']}", base_dir=str(folder))
                for t in tickets
            ]
        )
        unique = list(dict.fromkeys(ids))
        if len(unique) < len(ids):
            out.print(
                f"{len(ids) - len(unique)} duplicate delivery returned the existing run (idempotency key)"
            )
        runs = await _progress(engine, unique, TERMINAL | {"waiting"}, "triaging", out)
        waiting = [r for r in runs if r.status == "waiting"]
        if waiting:
            out.print(f"\n{len(waiting)} run(s) wait for a human decision at [bold]human_review[/bold].")
            out.print(
                f"  by hand: tower approve {waiting[0].id} human_review   |   tower reject ... --reason '...'"
            )
            if decide:
                out.print(
                    f"  deciding now as [yellow]{AUTO_APPROVER}[/yellow]: approve if review score >= 0.6"
                )
                await asyncio.gather(*[_auto_decide(engine, r) for r in waiting])
                runs = await _progress(engine, unique, TERMINAL, "resuming", out)
        elapsed = time.monotonic() - started
        summary = _summary(spec, runs, elapsed, out)
        stats = gateway.metrics.snapshot()
        calls = sum(sum(s["calls"].values()) for s in stats.values())
        stopped = sum(n for s in stats.values() for status, n in s["calls"].items() if status != "ok")
        chain = await gateway.audit.verify()
        out.print(
            f"Governance: {calls} tool calls through the gateway, {stopped} stopped; audit chain "
            + ("[green]intact[/green]" if chain.ok else "[red]BROKEN[/red]")
            + f" ({chain.checked} records). See: tower audit list, tower tools list."
        )
        summary["governed_calls"] = calls
        summary["audit_ok"] = chain.ok
        return summary
    finally:
        await engine.close()


async def _progress(
    engine: EmbeddedEngine, ids: list[str], statuses: frozenset[str], label: str, out: Console
) -> list[RunRecord]:
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=out, transient=False) as progress:
        task = progress.add_task(label, total=len(ids))

        async def one(run_id: str) -> RunRecord:
            info = await engine.wait(run_id, statuses=statuses)
            progress.advance(task)
            return info

        return list(await asyncio.gather(*[one(i) for i in ids]))


async def _auto_decide(engine: EmbeddedEngine, run: RunRecord) -> None:
    steps = await engine.store.load_steps(run.id)
    review = steps.get("human_review")
    score = ((review.input or {}).get("review") or {}).get("score", 0) if review else 0
    approved = score >= 0.6
    comment = f"review score {score}" + ("" if approved else ": below 0.6, a human should write this one")
    await engine.decide(run.id, "human_review", approved=approved, by=AUTO_APPROVER, comment=comment)


def _summary(spec: Any, runs: list[RunRecord], elapsed: float, out: Console) -> dict[str, Any]:
    actions: dict[str, int] = {}
    for r in runs:
        action = (r.output or {}).get("action", r.status) if r.status == "completed" else r.status
        actions[action] = actions.get(action, 0) + 1
    cycle = [(r.finished_at or r.updated_at) - r.created_at for r in runs if r.finished_at]
    table = Table("measure", "value", title="Support triage: results")
    table.add_row("tickets", str(len(runs)))
    for action in ("auto_sent", "sent_after_review", "escalated", "failed", "waiting"):
        if actions.get(action):
            table.add_row(f"  {action.replace('_', ' ')}", str(actions[action]))
    if cycle:
        table.add_row("mean cycle time (incl. approvals)", f"{sum(cycle) / len(cycle):.2f} s")
    table.add_row("model cost", "$0.00 (offline agents)")
    kpis = compute_kpis(spec, runs)
    saved = 0.0
    for k in kpis:
        value = "-" if k.value is None else (f"{k.value:.0%}" if spec_rate(spec, k.name) else f"{k.value:g}")
        target = f" (target {k.target:.0%})" if k.target is not None and spec_rate(spec, k.name) else ""
        table.add_row(f"KPI {k.name}", value + target)
        saved += k.minutes_saved or 0.0
    if saved:
        table.add_row("estimated agent time saved", f"{saved:.0f} min ({saved / 60:.1f} h)")
    table.add_row("wall time", f"{elapsed:.1f} s")
    out.print(table)
    out.print("Next: [bold]tower runs[/bold] to list runs, [bold]tower show RUN[/bold] for a timeline.")
    return {"actions": actions, "kpis": {k.name: k.value for k in kpis}, "saved_minutes": saved}


def spec_rate(spec: Any, name: str) -> bool:
    return any(k.name == name and k.aggregate == "rate" for k in spec.kpis)
