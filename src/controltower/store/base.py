"""The Store seam: records and the protocol every backend implements.

The engine only talks to this protocol; SQLite and PostgreSQL share one SQL
implementation (`SqlStore`) and differ in connection set-up and locking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

RunStatus = Literal["pending", "running", "waiting", "completed", "failed", "cancelled"]
StepStatus = Literal["completed", "failed", "waiting", "skipped", "compensated"]

TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
ACTIVE: frozenset[str] = frozenset({"pending", "running", "waiting"})


@dataclass(slots=True)
class WorkflowRecord:
    name: str
    version: int
    digest: str
    spec: dict[str, Any]
    base_dir: str | None
    created_at: float


@dataclass(slots=True)
class RunRecord:
    id: str
    workflow: str
    version: int
    status: str
    input: Any
    created_at: float
    updated_at: float
    tenant: str = "default"
    output: Any = None
    error: dict[str, Any] | None = None
    idempotency_key: str | None = None
    parent_run_id: str | None = None
    parent_step_key: str | None = None
    owner: str | None = None
    lease_expires_at: float | None = None
    wake_at: float | None = None
    cancel_requested: bool = False
    finished_at: float | None = None
    waiting_on: str | None = None


@dataclass(slots=True)
class StepRecord:
    run_id: str
    step_key: str
    step_id: str
    kind: str
    status: str
    started_at: float
    finished_at: float | None = None
    attempts: int = 1
    input: Any = None
    output: Any = None
    error: dict[str, Any] | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SignalRecord:
    id: int
    run_id: str
    name: str
    payload: Any
    created_at: float
    consumed_at: float | None = None


@dataclass(slots=True)
class RunFilter:
    workflow: str | None = None
    status: Sequence[str] | None = None
    tenant: str | None = None
    parent_run_id: str | None = None
    limit: int = 50
    before_id: str | None = None


class Store(Protocol):
    """Durable state of workflows, runs, steps and signals."""

    url: str

    async def migrate(self) -> None: ...
    async def close(self) -> None: ...

    # workflow versions
    async def publish(
        self, name: str, spec: dict[str, Any], digest: str, base_dir: str | None, now: float
    ) -> WorkflowRecord: ...
    async def get_workflow(self, name: str, version: int | None = None) -> WorkflowRecord | None: ...
    async def list_workflows(self) -> list[WorkflowRecord]: ...

    # runs
    async def create_run(self, run: RunRecord) -> tuple[RunRecord, bool]: ...
    async def get_run(self, run_id: str) -> RunRecord | None: ...
    async def list_runs(self, flt: RunFilter) -> list[RunRecord]: ...
    async def update_run(self, run_id: str, fields: dict[str, Any]) -> None: ...
    async def set_run_status(
        self,
        run_id: str,
        status: str,
        now: float,
        *,
        expect: Sequence[str] | None = None,
        extra: dict[str, Any] | None = None,
        owner: str | None = None,
    ) -> bool: ...

    # leases: one engine process executes a run at a time
    async def claim_run(self, run_id: str, owner: str, now: float, lease: float) -> bool: ...
    async def claim_ready(self, owner: str, now: float, lease: float, limit: int) -> list[str]: ...
    async def renew_leases(self, owner: str, run_ids: Sequence[str], until: float) -> dict[str, bool]: ...
    async def release_run(self, run_id: str, owner: str) -> None: ...

    # steps
    async def save_step(self, step: StepRecord, owner: str | None = None) -> None: ...
    async def load_steps(self, run_id: str) -> dict[str, StepRecord]: ...
    async def load_state(
        self, run_id: str
    ) -> tuple[RunRecord | None, dict[str, StepRecord], list[SignalRecord]]: ...
    async def park_run(
        self,
        run_id: str,
        now: float,
        wake_at: float | None,
        waiting_on: str,
        signals: Sequence[str],
    ) -> bool: ...
    async def delete_step(self, run_id: str, step_key: str) -> None: ...
    async def delete_steps(self, run_id: str, step_keys: Sequence[str]) -> None: ...

    # signals (events, approval decisions): the only way to wake a parked run
    async def send_signal(self, run_id: str, name: str, payload: Any, now: float) -> int: ...
    async def send_signal_once(self, run_id: str, name: str, payload: Any, now: float) -> int | None:
        """Send a signal unless one with this name was ever sent to the run (then None); atomic."""
        ...

    async def list_signals(self, run_id: str) -> list[SignalRecord]: ...
    async def consume_signal(self, signal_id: int, now: float) -> bool: ...

    # payloads: large values stored once, by content hash
    async def get_payload(self, digest: str) -> Any: ...
