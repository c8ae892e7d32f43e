"""Helpers shared by the trigger tests."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import pytest

from controltower.engine import EmbeddedEngine
from controltower.spec.models import WorkflowSpec
from controltower.store import RunFilter, RunRecord, SqlStore


@dataclass
class Services:
    engine: EmbeddedEngine
    store: SqlStore


def spec(name: str, **extra: Any) -> WorkflowSpec:
    """A one-step workflow that echoes its input."""
    return WorkflowSpec.model_validate(
        {
            "name": name,
            "tools": {"echo": {"impl": "builtin:echo"}},
            "steps": [{"id": "echo", "kind": "tool", "tool": "echo", "input": "${{ input }}"}],
            **extra,
        }
    )


async def runs_of(store: SqlStore, workflow: str) -> list[RunRecord]:
    return await store.list_runs(RunFilter(workflow=workflow, limit=10_000))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def service_missing(reason: str) -> None:
    """Skip (or, under CI=true, fail) a test whose service is not running."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)
