"""A command whose optional extra is missing says which extra to install, with no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_serve_without_the_server_extra_names_it(tmp_path: Path) -> None:
    hide = tmp_path / "hide"
    hide.mkdir()
    # as if `pip install controltower` (no [server]): importing uvicorn fails
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['uvicorn'] = None\n")
    env = {
        **os.environ,
        "PYTHONPATH": str(hide),
        "TOWER_DB_URL": f"sqlite:///{tmp_path / 'tower.db'}",
        "NO_COLOR": "1",
    }
    env.pop("TOWER_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "controltower.cli.main", "serve", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "extra_missing" in proc.stderr
    assert "controltower[server]" in proc.stderr
    assert "uvicorn" in proc.stderr
