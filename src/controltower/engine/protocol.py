"""The Engine seam: what the CLI, the API and triggers need from any engine."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from controltower.spec.models import WorkflowSpec
from controltower.store.base import RunRecord, WorkflowRecord


class Engine(Protocol):
    async def publish(self, spec: WorkflowSpec, base_dir: str | None = None) -> WorkflowRecord: ...

    async def start(
        self,
        spec: WorkflowSpec | str,
        input: Any = None,
        *,
        version: int | None = None,
        idempotency_key: str | None = None,
        tenant: str = "default",
        base_dir: str | None = None,
        execute: bool = True,
        parent: tuple[str, str] | None = None,
    ) -> str: ...

    async def get(self, run_id: str) -> RunRecord: ...
    async def wait(
        self, run_id: str, *, statuses: Iterable[str] = ..., timeout: float | None = None
    ) -> RunRecord: ...
    async def decide(
        self, run_id: str, step: str, *, approved: bool, by: str, comment: str | None = None
    ) -> str: ...
    async def signal(self, run_id: str, event: str, data: Any = None) -> None: ...
    async def cancel(self, run_id: str, *, reason: str | None = None) -> RunRecord: ...
    async def resume(self, run_id: str) -> None: ...
    async def close(self) -> None: ...
