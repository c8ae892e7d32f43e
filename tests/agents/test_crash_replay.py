"""A process killed after its model calls committed: the replay serves them from the record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

WORKER = Path(__file__).with_name("llm_worker.py")


def _run(mode: str, url: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(WORKER), mode, url], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


@pytest.mark.slow
def test_sigkill_after_model_calls_then_recovery_does_not_call_the_model_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tower.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("TOWER_MODEL", "TOWER_DB_URL")}
    crashed = _run("crash", url, {**env, "LLM_CRASH": "1"}, tmp_path)
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    assert crashed.stdout.startswith("started")

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        recorded = conn.execute(
            sa.text("SELECT call_index, model FROM model_calls ORDER BY call_index")
        ).all()
        step = conn.execute(sa.text("SELECT status FROM steps WHERE step_key = 'triage'")).all()
    engine.dispose()
    assert [tuple(r) for r in recorded] == [(0, "openai:gpt-4o-mini"), (1, "openai:gpt-4o-mini")]
    assert [r.status for r in step] != ["completed"]

    recovered = _run("recover", url, {**env, "LLM_CRASH": "0"}, tmp_path)
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    report = json.loads(recovered.stdout.strip().splitlines()[-1])
    assert report["status"] == "completed", report
    assert report["output"] == {"category": "billing"}
    # one real call, with the whole recorded conversation: prompt, 2 responses, 2 tool results
    assert report["histories"] == [5]
