"""The governed example from the command line: approvals inbox, kill switch, audit, policy suites."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from .test_cli import ROOT, Tower

REFUNDS = ROOT / "examples" / "refunds"
pytestmark = pytest.mark.slow


@pytest.fixture
def tower(tmp_path: Path) -> Tower:
    return Tower(tmp_path)


def test_refund_waits_for_finance_then_runs_once(tower: Tower) -> None:
    run = tower.run_json(str(REFUNDS / "workflow.yaml"), "--input", '{"ticket": "T-1", "amount_cents": 4200}')
    assert run["status"] == "waiting"
    assert run["waiting_on"] == "tool_approval:refund"
    inbox = tower("approvals").stdout
    (approval_id,) = set(re.findall(r"apr_[0-9a-z]+", inbox))
    shown = json.loads(tower("approvals", "show", approval_id).stdout)
    assert shown["tool"] == "refunds.issue_refund"
    assert shown["args"] == {"ticket": "T-1", "amount_cents": 4200}
    assert shown["approval_group"] == "finance"
    assert shown["context"]["policies"] == ["refunds-need-finance"]
    # the wrong group is refused; nothing is decided
    wrong = tower(
        "approvals", "approve", approval_id, "--as", "sam", "--role", "approver", "--group", "sales", ok=False
    )
    assert wrong.returncode == 1
    assert "error[forbidden]" in wrong.stderr
    done = tower(
        "approvals", "approve", approval_id, "--as", "fiona", "--role", "approver", "--group", "finance"
    )
    assert "completed" in done.stdout
    final = json.loads(tower("show", str(run["id"]), "--json").stdout)
    assert final["status"] == "completed"
    assert final["output"]["refunded_cents"] == 4200
    again = tower("approvals", "approve", approval_id, "--group", "finance", ok=False)
    assert "error[conflict]" in again.stderr
    assert "intact" in tower("audit", "verify").stdout
    who = tower("tools", "who-can", "refunds.issue_refund").stdout
    assert "refunds" in who
    assert "finance" in who


def test_forbidden_refund_fails_the_step_with_the_policy_reason(tower: Tower) -> None:
    proc = tower(
        "run", str(REFUNDS / "workflow.yaml"), "--input", '{"ticket": "T-2", "amount_cents": 90000}', ok=False
    )
    assert proc.returncode == 1
    assert "refund-ceiling" in proc.stdout
    listed = tower("audit", "list").stdout
    assert "denied" in listed


def test_kill_switch_and_tamper_detection(tower: Tower) -> None:
    tower("publish", str(REFUNDS / "workflow.yaml"))
    tower("pause", "refunds", "--reason", "payment provider incident")
    proc = tower(
        "run", str(REFUNDS / "workflow.yaml"), "--input", '{"ticket": "T-3", "amount_cents": 100}', ok=False
    )
    assert "paused" in proc.stdout
    tower("unpause", "refunds")
    db = sqlite3.connect(tower.home / "tower.db")
    db.execute("UPDATE audit SET reason = 'nothing happened' WHERE seq = 1")
    db.commit()
    db.close()
    tampered = tower("audit", "verify", ok=False)
    assert tampered.returncode == 1
    assert "TAMPERED" in tampered.stdout
    export = tower.home / "audit.jsonl"
    tower("audit", "export", str(export))
    assert len(export.read_text().splitlines()) >= 2


def test_policy_suite_runs_and_explains(tower: Tower) -> None:
    suite = tower("policy", "test", str(REFUNDS / "policy_suite.yaml"))
    assert "4 passed, 0 failed" in suite.stdout
    tower("publish", str(REFUNDS / "workflow.yaml"))
    explained = tower(
        "policy",
        "test",
        "--tool",
        "refunds.issue_refund",
        "--workflow",
        "refunds",
        "--args",
        '{"ticket": "T", "amount_cents": 60000}',
    ).stdout
    assert "deny" in explained
    assert "refund-ceiling" in explained
    bad = tower("policy", "test", "--tool", "nope.tool", ok=False)
    assert "error[unknown_tool]" in bad.stderr


def test_autonomy_four_eyes(tower: Tower) -> None:
    tower("publish", str(REFUNDS / "workflow.yaml"))
    tightened = tower("autonomy", "set", "refunds", "draft_only", "--reason", "incident", "--as", "ops")
    assert "now draft_only" in tightened.stdout
    pending = tower("autonomy", "set", "refunds", "expanded", "--reason", "fixed", "--as", "ops")
    assert "waits for another person" in pending.stdout
    same = tower("autonomy", "approve", "refunds", "--as", "ops", ok=False)
    assert "error[autonomy_change_refused]" in same.stderr
    assert "now expanded" in tower("autonomy", "approve", "refunds", "--as", "lead").stdout
    assert "control" in tower("audit", "list").stdout
