"""`tower demo`: the support-triage template over sample tickets, end to end, offline."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from controltower.engine import EmbeddedEngine
from controltower.observability import compute_kpis
from controltower.spec.errors import InvalidInputError
from controltower.store import TERMINAL, RunRecord

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
AUTO_APPROVER = "auto-approver (demo mode)"


async def run_demo(db: str | None, count: int, out: Console, *, decide: bool = True) -> dict[str, Any]:
    from controltower.spec.loader import load_spec_file

    folder = TEMPLATES / "support_triage"
    spec = load_spec_file(folder / "workflow.yaml")
    tickets = load_tickets(folder, count)
    tickets.append(dict(tickets[0]))  # a duplicate delivery: the idempotency key dedupes it
    session = time.strftime("%Y%m%d%H%M%S")
    # each demo gets its own sandbox helpdesk, so a second demo does not find the first one's
    # replies (and call every ticket a duplicate)
    engine = await EmbeddedEngine.open(db)  # before TOWER_HOME changes: it picks the default store
    home = os.environ.get("TOWER_HOME")
    sandbox = Path(home or ".tower") / "demo" / session
    os.environ["TOWER_HOME"] = str(sandbox)
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
        if os.environ.get("TOWER_MODEL"):
            out.print(f"[dim]Model {escape(os.environ['TOWER_MODEL'])}: the llm agents call it.[/dim]")
        else:
            out.print(
                "[dim]No model configured: the llm agents run their offline heuristics "
                "(set TOWER_MODEL to use a model).[/dim]"
            )
        started = time.monotonic()
        refused: list[str] = []

        async def start(ticket: dict[str, Any]) -> str | None:
            try:
                key = f"demo-{session}:{ticket['id']}"
                return await engine.start(spec, ticket, idempotency_key=key, base_dir=str(folder))
            except InvalidInputError as exc:
                refused.append(f"{ticket['id']}: {exc.message}")
                return None

        started_ids = await asyncio.gather(*[start(t) for t in tickets])
        ids = [i for i in started_ids if i is not None]
        for line in refused:
            out.print(f"[yellow]refused at intake[/yellow] {escape(line)}")
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
        summary = _summary(spec, runs, elapsed, out, refused=len(refused))
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
        _next_steps(out, unique[0] if unique else None, folder, sandbox)
        return summary
    finally:
        await engine.close()
        if home is None:
            os.environ.pop("TOWER_HOME", None)
        else:
            os.environ["TOWER_HOME"] = home


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


def load_tickets(folder: Path, count: int) -> list[dict[str, Any]]:
    """The first ``count`` seeded tickets, without the eval annotations (keys starting with _)."""
    raw: list[dict[str, Any]] = json.loads((folder / "data" / "tickets.json").read_text(encoding="utf-8"))
    return [{k: v for k, v in t.items() if not k.startswith("_")} for t in raw[:count]]


def _next_steps(out: Console, run_id: str | None, folder: Path, sandbox: Path) -> None:
    out.print("\n[bold]Where to look next[/bold]")
    out.print("  tower runs                     every run of the demo, newest first")
    if run_id:
        out.print(f"  tower show {run_id}   the timeline of one ticket")
    out.print("  tower approvals                approvals waiting for a human (none left: all decided)")
    out.print("  tower audit list               the hash-chained record of every tool call")
    out.print(f"  sqlite3 {sandbox / 'sandbox' / 'helpdesk.sqlite'} 'select * from replies'")
    out.print("                                 the sandbox helpdesk: replies, escalations, duplicates")
    out.print(f"  tower eval {folder}")
    out.print(
        "                                 the eval suite: every seeded ticket against its expected outcome"
    )
    out.print("  tower init --template support_triage my-support   start your own from this template")
    out.print("  tower serve                    the HTTP API and the dashboard at /ui")


def _summary(
    spec: Any, runs: list[RunRecord], elapsed: float, out: Console, *, refused: int = 0
) -> dict[str, Any]:
    actions: dict[str, int] = {}
    for r in runs:
        action = (r.output or {}).get("action", r.status) if r.status == "completed" else r.status
        actions[action] = actions.get(action, 0) + 1
    cycle = [(r.finished_at or r.updated_at) - r.created_at for r in runs if r.finished_at]
    table = Table("measure", "value", title="Support triage: results")
    table.add_row("tickets", str(len(runs) + refused))
    automated = actions.get("auto_sent", 0) + actions.get("duplicate", 0)
    table.add_row("  automated (no human)", str(automated))
    table.add_row(
        "  with a human (review or escalation)",
        str(actions.get("sent_after_review", 0) + actions.get("escalated", 0)),
    )
    if refused:
        table.add_row("  refused at intake (invalid input)", str(refused))
    for action in ("auto_sent", "duplicate", "sent_after_review", "escalated", "failed", "waiting"):
        if actions.get(action):
            table.add_row(f"  {action.replace('_', ' ')}", str(actions[action]))
    if cycle:
        table.add_row("mean cycle time (incl. approvals)", f"{sum(cycle) / len(cycle):.2f} s")
    if os.environ.get("TOWER_MODEL"):
        table.add_row("model cost", "charged to the budget ledger (see tower audit list)")
    else:
        table.add_row("model cost", "$0.00 (offline agents, no model configured)")
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
    return {"actions": actions, "kpis": {k.name: k.value for k in kpis}, "saved_minutes": saved}


def spec_rate(spec: Any, name: str) -> bool:
    return any(k.name == name and k.aggregate == "rate" for k in spec.kpis)
