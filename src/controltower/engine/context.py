"""What a step implementation sees, and the signals the interpreter uses to stop a run."""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from controltower.memory.store import MemoryView
    from controltower.spec.models import WorkflowSpec
    from controltower.store.base import WorkflowRecord
    from controltower.store.sql import SqlStore


@dataclass(slots=True)
class StepContext:
    """Handed to tools and agents that ask for it (a parameter named ``ctx``).

    ``idempotency_key`` is stable across retries, replays and engine restarts: pass it
    to any external system that can de-duplicate (payments, tickets, e-mails).
    """

    run_id: str
    step_key: str
    step_id: str
    workflow: str
    attempt: int
    tenant: str = "default"
    base_dir: str | None = None
    agent: str | None = None
    gate: ToolGate | None = field(default=None, repr=False)
    spec: WorkflowSpec | None = field(default=None, repr=False)
    workflow_version: int | None = None
    store: SqlStore | None = field(default=None, repr=False)  # model calls are recorded here
    _calls: int = 0
    _reads: list[dict[str, Any]] = field(default_factory=list, repr=False)
    _memory: MemoryView | None = field(default=None, repr=False)

    @property
    def idempotency_key(self) -> str:
        return f"{self.run_id}:{self.step_key}"

    @property
    def memory(self) -> MemoryView:
        """Long-term memory of this run's tenant and workflow; its reads are recorded as provenance."""
        if self._memory is None:
            from controltower.memory.binding import view_for

            self._memory = view_for(self)
        return self._memory

    def record_read(self, source: str, ref: str, digest: str | None = None, note: str | None = None) -> None:
        """Note what this step read (a record, a document): every tool call the step makes
        afterwards carries the list as ``data_read``, for the approver and the audit trail."""
        item = {"source": source, "ref": ref}
        if digest is not None:
            item["digest"] = digest
        if note is not None:
            item["note"] = note
        if item not in self._reads:
            self._reads.append(item)

    @property
    def reads(self) -> list[dict[str, Any]]:
        return list(self._reads)

    async def call_tool(
        self, tool: str, args: dict[str, Any] | None = None, **proposal: Any
    ) -> dict[str, Any]:
        """Call a tool through the governed gateway, as this step's agent.

        Returns ``{"status": "ok", "output": ...}`` or, when the gateway stops the call,
        ``{"status": "denied"|"drafted"|"error", "code": ..., "reason": ...}`` — a denial is
        an answer to act on, not an exception. A call that needs approval parks the run;
        after the decision the step runs again and earlier calls replay their recorded results.
        ``proposal`` (e.g. ``reasoning=...``, ``data_read=[...]``) is shown to the approver.
        """
        if self.gate is None:
            raise RuntimeError("no tool gateway is configured for this engine")
        index = self._calls
        self._calls += 1
        if self._reads:
            given = list(proposal.get("data_read") or [])
            proposal["data_read"] = given + [r for r in self._reads if r not in given]
        call = ToolInvocation(
            tool=tool,
            args=args or {},
            ctx=self,
            agent=self.agent,
            index=index,
            proposal=proposal or None,
        )
        outcome = await self.gate.invoke(call)
        if outcome.status == "pending_approval":
            assert outcome.wait is not None
            raise Parked([outcome.wait])
        return outcome.for_agent()

    def now(self) -> float:
        return time.time()

    def random(self) -> random.Random:
        """A generator seeded by the step, so a replayed decision comes out the same."""
        seed = hashlib.sha256(f"{self.run_id}/{self.step_key}/{self.attempt}".encode()).digest()
        return random.Random(int.from_bytes(seed[:8], "big"))


@dataclass(frozen=True, slots=True)
class WaitInfo:
    """One thing a parked run waits for."""

    step_key: str
    kind: str  # approval | event | timer | child
    signal: str | None
    deadline: float | None


class Parked(Exception):
    """Raised through the interpreter when every live branch waits on the outside world."""

    def __init__(self, waits: list[WaitInfo]) -> None:
        super().__init__(", ".join(w.step_key for w in waits))
        self.waits = waits


@dataclass
class StepFailed(Exception):
    """A step failed for good (retries exhausted or a non-retryable error)."""

    step_key: str
    error: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"step {self.step_key} failed: {self.error.get('message', '')}"


class RunCancelled(Exception):
    pass


def unit_random(*parts: object) -> float:
    """Deterministic float in [0, 1) from the given parts (jitter that replays identically)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True, slots=True)
class ToolInvocation:
    """One tool call asked for by a tool step (``agent`` None) or by an agent inside its step."""

    tool: str
    args: Any
    ctx: StepContext
    agent: str | None = None
    index: int = 0
    proposal: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class GateOutcome:
    status: str  # ok | denied | pending_approval | drafted | error
    output: Any = None
    code: str | None = None
    reason: str | None = None
    retryable: bool = False
    wait: WaitInfo | None = None

    def for_agent(self) -> dict[str, Any]:
        if self.status == "ok":
            return {"status": "ok", "output": self.output}
        return {"status": self.status, "code": self.code, "reason": self.reason}


class ToolGate(Protocol):
    """The engine's seam to the governed tool gateway (implemented in controltower.gateway)."""

    async def invoke(self, call: ToolInvocation) -> GateOutcome: ...

    async def on_publish(self, spec: WorkflowSpec, record: WorkflowRecord, base_dir: str | None) -> None: ...

    async def aclose(self) -> None:
        """Finish pending records and close connections; called before the store closes."""
        ...
