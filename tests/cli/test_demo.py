"""`tower demo`: the support workflow over the seeded helpdesk, with the KPI summary and next steps."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from controltower.cli.demo import load_tickets, run_demo

TEMPLATE = Path(__file__).resolve().parents[2] / "src/controltower/templates/support_triage"


def test_demo_tickets_come_without_eval_annotations() -> None:
    tickets = load_tickets(TEMPLATE, 100)
    assert len(tickets) >= 50
    assert not any(key.startswith("_") for t in tickets for key in t)


async def test_demo_summarises_kpis_and_says_where_to_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOWER_HOME", str(tmp_path))
    buffer = io.StringIO()
    summary = await run_demo(f"sqlite:///{tmp_path / 'tower.db'}", 20, Console(file=buffer, width=200))
    text = buffer.getvalue()
    for expected in (
        "automated (no human)",
        "with a human (review or escalation)",
        "refused at intake (invalid input)",  # ticket 18 of the seed has no body
        "mean cycle time",
        "model cost",
        "estimated agent time saved",
        "Where to look next",
        "tower show run_",
        "tower eval",
    ):
        assert expected in text, expected
    assert summary["audit_ok"] is True
    actions = summary["actions"]
    assert sum(actions.values()) == 19  # 20 tickets, one refused at intake
    assert actions.get("escalated", 0) >= 5
    assert actions.get("auto_sent", 0) >= 8
    assert "failed" not in actions
    assert "waiting" not in actions
