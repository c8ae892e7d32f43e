"""The gateway tests' worker subprocesses (budget_worker.py), driven line by line."""

from __future__ import annotations

import os
from pathlib import Path

from tests.durability.helpers import PromptProc

BUDGET_WORKER = Path(__file__).with_name("budget_worker.py")


class Proc(PromptProc):
    """budget_worker.py MODE ARGS... as a subprocess, without the test run's store variables."""

    def __init__(self, *args: str, stderr: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("TOWER_FAULT_KILL_IN_COMMIT", "TOWER_DB_URL")}
        super().__init__(BUDGET_WORKER, list(args), env, stderr)
