"""The `tower` command as a user runs it: a real process, a real SQLite file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "examples" / "hello.yaml"
pytestmark = pytest.mark.slow


class Tower:
    def __init__(self, home: Path) -> None:
        self.env = {
            **os.environ,
            "TOWER_DB_URL": f"sqlite:///{home / 'tower.db'}",
            "TOWER_HOME": str(home),
            "NO_COLOR": "1",
            "COLUMNS": "200",
        }
        self.env.pop("TOWER_DEBUG", None)
        self.home = home

    def __call__(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "controltower.cli.main", *args],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.home,
            timeout=60,
        )
        assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
        if ok:
            assert proc.returncode == 0, proc.stderr + proc.stdout
        return proc

    def run_json(self, *args: str) -> dict[str, object]:
        proc = self("run", *args, "--json")
        data: dict[str, object] = json.loads(proc.stdout)
        return data


@pytest.fixture
def tower(tmp_path: Path) -> Tower:
    return Tower(tmp_path)


def test_run_parks_on_approval_then_approve_completes(tower: Tower) -> None:
    run = tower.run_json(str(HELLO), "--input", '{"name": "Ada"}')
    assert run["status"] == "waiting"
    assert run["waiting_on"] == "approval:sign_off"
    run_id = str(run["id"])

    decided = tower("approve", run_id, "sign_off", "--by", "alice", "--comment", "looks good")
    assert "approved sign_off" in decided.stdout
    assert "completed" in decided.stdout

    shown = json.loads(tower("show", run_id, "--json").stdout)
    assert shown["status"] == "completed"
    assert shown["output"] == {"sent": "Hello, Ada"}
    steps = {s["key"]: s for s in shown["steps"]}
    assert list(steps) == ["greet", "sign_off", "send"]
    assert steps["sign_off"]["output"]["by"] == "alice"
    assert all(s["status"] == "completed" for s in steps.values())

    listing = tower("runs").stdout
    assert run_id in listing
    assert "completed" in listing
    timeline = tower("show", run_id).stdout
    assert "Timeline" in timeline
    assert "sign_off" in timeline


def test_deciding_twice_or_after_the_end_is_a_clear_error(tower: Tower) -> None:
    run_id = str(tower.run_json(str(HELLO), "-i", '{"name": "Bo"}')["id"])
    tower("reject", run_id, "sign_off", "--reason", "wrong tone")
    again = tower("approve", run_id, "sign_off", ok=False)
    assert again.returncode == 1
    assert "error[invalid_state]" in again.stderr
    shown = json.loads(tower("show", run_id, "--json").stdout)
    assert shown["status"] == "failed"
    assert "wrong tone" in shown["error"]["message"]


def test_bad_input_is_one_line_and_writes_nothing(tower: Tower) -> None:
    bad_json = tower("run", str(HELLO), "--input", "{name: Ada", ok=False)
    assert bad_json.returncode == 1
    assert bad_json.stderr.startswith("error[invalid_input]")
    assert "not valid JSON" in bad_json.stderr

    wrong_type = tower("run", str(HELLO), "--input", '{"name": 42}', ok=False)
    assert wrong_type.returncode == 1
    assert "error[invalid_input]" in wrong_type.stderr
    assert "name" in wrong_type.stderr

    missing_file = tower("run", str(HELLO), "--input", "@nope.json", ok=False)
    assert "cannot read input file" in missing_file.stderr
    assert "No runs" in tower("runs").stdout or "run_" not in tower("runs").stdout


def test_unknown_things_get_typed_errors(tower: Tower) -> None:
    missing = tower("show", "run_doesnotexist", ok=False)
    assert missing.returncode == 1
    assert "error[not_found]" in missing.stderr

    usage = tower("runs", "--limit", "0", ok=False)
    assert usage.returncode == 2
    assert "error[usage]" in usage.stderr

    unknown_workflow = tower("run", "no-such-workflow", ok=False)
    assert "error[not_found]" in unknown_workflow.stderr
    assert "tower publish" in unknown_workflow.stderr

    bad_db = tower("--db", "mysql://nowhere/x", "runs", ok=False)
    assert "error[store_error]" in bad_db.stderr


def test_validate_reports_every_problem_with_lines(tower: Tower) -> None:
    spec = tower.home / "broken.yaml"
    spec.write_text(
        "name: broken\n"
        "steps:\n"
        "  - id: a\n"
        "    kind: tool\n"
        "    tool: missing_tool\n"
        "  - id: b\n"
        "    kind: route\n"
        "    routes:\n"
        "      - when: input.x > 1\n"
        "        goto: nowhere\n"
        "  - id: c\n"
        "    kind: teleport\n"
    )
    result = tower("validate", str(spec), ok=False)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(lines) >= 3, result.stderr
    assert all("broken.yaml:" in line for line in lines)
    assert any("teleport" in line for line in lines)
    assert "ok" in tower("validate", str(HELLO)).stdout


def test_schema_is_json_schema(tower: Tower) -> None:
    schema = json.loads(tower("schema").stdout)
    assert schema["title"] == "WorkflowSpec"
    assert "steps" in schema["properties"]


def test_signal_cancel_and_publish(tower: Tower) -> None:
    spec = tower.home / "waiter.yaml"
    spec.write_text(
        "name: waiter\n"
        "tools: {echo: {impl: 'builtin:echo'}}\n"
        "steps:\n"
        "  - {id: hold, kind: wait, event: go}\n"
        "  - {id: done, kind: tool, tool: echo, input: {got: '${{ steps.hold.output.data.n }}'}}\n"
    )
    published = tower("publish", str(spec)).stdout
    assert "published waiter version 1" in published
    assert "version 1" in tower("publish", str(spec)).stdout  # same content, same version

    first = str(tower.run_json("waiter")["id"])
    sent = tower("signal", first, "go", "--data", '{"n": 7}')
    assert "completed" in sent.stdout
    assert json.loads(tower("show", first, "--json").stdout)["output"] == {"got": 7}

    second = str(tower.run_json("waiter")["id"])
    assert "cancelled" in tower("cancel", second).stdout
    assert json.loads(tower("show", second, "--json").stdout)["status"] == "cancelled"
    assert "waiter" in tower("workflows").stdout


def test_demo_runs_end_to_end(tower: Tower) -> None:
    result = tower("demo", "--tickets", "15")
    out = result.stdout
    assert "support-triage" in out
    assert "duplicate delivery returned the existing run" in out
    assert "auto-approver (demo mode)" in out
    assert "KPI automation_rate" in out
    assert "estimated agent time saved" in out
    assert "0 stopped; audit chain intact" in " ".join(out.split())
    runs = tower("runs", "--limit", "100").stdout
    assert runs.count("completed") == 15
