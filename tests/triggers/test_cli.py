"""`tower triggers list|sign|run` as a user runs them: real processes, a real SQLite file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controltower.triggers import verify

pytestmark = pytest.mark.slow

WORKFLOW = """
name: ticking
tools:
  echo: {impl: "builtin:echo"}
triggers:
  - kind: webhook
    secret_env: TICK_SECRET
  - kind: cron
    schedule: "* * * * *"
    timezone: Europe/Paris
steps:
  - id: e
    kind: tool
    tool: echo
    input: {hello: world}
"""


def environment(home: Path) -> dict[str, str]:
    env = {**os.environ, "TOWER_DB_URL": f"sqlite:///{home / 'tower.db'}", "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop("TOWER_DEBUG", None)
    return env


def test_list_sign_and_run(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from controltower.cli.main import cli

    (tmp_path / "wf.yaml").write_text(WORKFLOW)
    env = environment(tmp_path)
    cli_runner = CliRunner(env=env)
    assert cli_runner.invoke(cli, ["publish", str(tmp_path / "wf.yaml")]).exit_code == 0
    listed = json.loads(cli_runner.invoke(cli, ["triggers", "list", "--json"]).stdout)
    assert [t["trigger"]["kind"] for t in listed] == ["webhook", "cron"]

    sign = ["triggers", "sign", "--secret-env", "TICK_SECRET", "--data", '{"a": 1}']
    signed = cli_runner.invoke(cli, sign, env={"TICK_SECRET": "s3"})
    headers = json.loads(signed.stdout)
    stamp, signature = headers["X-Tower-Timestamp"], headers["X-Tower-Signature"]
    assert verify("s3", b'{"a": 1}', stamp, signature, tolerance=60) > 0
    missing = cli_runner.invoke(cli, sign, env={"TICK_SECRET": ""})
    assert missing.exit_code == 1
    assert "TICK_SECRET is not set" in missing.stderr

    proc = subprocess.Popen(
        [sys.executable, "-m", "controltower.cli.main", "triggers", "run", "--refresh", "0.5"],
        env=environment(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 40
        runs: list[dict[str, object]] = []
        while time.monotonic() < deadline and not any(r["status"] == "completed" for r in runs):
            time.sleep(0.5)
            runs = _runs(tmp_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "tower triggers stopped" in err
    assert [r["status"] for r in runs] == ["completed"]  # the first sight of a schedule fires its latest tick


def _runs(home: Path) -> list[dict[str, object]]:
    import sqlite3

    with sqlite3.connect(home / "tower.db") as conn:
        rows = conn.execute("select status, idempotency_key from runs").fetchall()
    return [{"status": s, "key": k} for s, k in rows]
