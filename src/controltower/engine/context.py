"""What a step implementation sees, and the signals the interpreter uses to stop a run."""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass, field
from typing import Any


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

    @property
    def idempotency_key(self) -> str:
        return f"{self.run_id}:{self.step_key}"

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
