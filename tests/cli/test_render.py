"""What the CLI prints stays usable on an 80-column terminal."""

from __future__ import annotations

import time

from rich.console import Console

from controltower.cli.render import runs_table
from controltower.store.base import RunRecord


def test_run_ids_are_never_truncated_at_80_columns() -> None:
    now = time.time()
    runs = [
        RunRecord(
            id=f"run_01m84h98xzx1gax1hv7q7py5d{i}",
            workflow="invoice-matching-with-a-long-name",
            version=12,
            status="waiting",
            input={},
            created_at=now,
            updated_at=now,
            waiting_on="approval:approve_payment (finance-director), due in 4 h" if i else None,
        )
        for i in range(3)
    ]
    console = Console(width=80, record=True, color_system=None)
    console.print(runs_table(runs))
    text = console.export_text()
    assert all(run.id in text for run in runs)
    assert max(len(line) for line in text.splitlines()) <= 80
