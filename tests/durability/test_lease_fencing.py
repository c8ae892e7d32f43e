"""A process that lost its lease (stalled heartbeat, blocked loop, GC pause) must not rewrite history.

Engine A runs step s2 of a run and stalls there with its heartbeat stuck; its 0.3 s lease
expires, engine B recovers the run and completes it. Then A wakes up and returns from s2.
A's late step result and run completion must be rejected: ``save_step``, ``park_run`` and
``_finish`` only land while the writer holds the run; a completed step is never overwritten.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from controltower.engine import EmbeddedEngine
from controltower.spec.models import WorkflowSpec

pytestmark = pytest.mark.slow

_executions: list[str] = []
_entered: asyncio.Event | None = None
_release: asyncio.Event | None = None


async def gated_step(payload: Any, ctx: Any) -> dict[str, int]:
    """s2's first execution (engine A's) blocks until released; later ones pass."""
    _executions.append(ctx.step_key)
    n = _executions.count(ctx.step_key)
    if ctx.step_key == "s2" and n == 1:
        assert _entered is not None
        assert _release is not None
        _entered.set()
        await _release.wait()
    return {"execution": n}


SPEC = WorkflowSpec.model_validate(
    {
        "name": "fencing",
        "tools": {"t": {"impl": f"{__name__}:gated_step"}},
        "steps": [{"id": "s1", "kind": "tool", "tool": "t"}, {"id": "s2", "kind": "tool", "tool": "t"}],
        "output": "${{ steps.s2.output }}",
    }
)


@pytest.mark.timeout(30)
async def test_stale_owner_cannot_overwrite_a_run_completed_by_the_new_owner(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    global _entered, _release
    _executions.clear()
    _entered, _release = asyncio.Event(), asyncio.Event()
    a = await EmbeddedEngine.open(store_url, lease=0.3, poll_interval=0.05)
    b = await EmbeddedEngine.open(store_url, lease=5.0, poll_interval=0.05)
    try:
        run_id = await a.start(SPEC, {})
        await asyncio.wait_for(_entered.wait(), 10)

        async def stalled(*_args: Any, **_kw: Any) -> dict[str, bool]:
            await asyncio.Event().wait()  # A's heartbeat never gets through
            raise AssertionError("unreachable")

        monkeypatch.setattr(a.store, "renew_leases", stalled)
        await asyncio.sleep(0.6)  # A's lease expires
        assert await b.recover() == 1, "B should take over the run whose lease expired"
        done = await b.wait(run_id, timeout=10)
        assert done.status == "completed"
        assert done.output == {"execution": 2}

        _release.set()  # A wakes up, still believing it owns the run
        await asyncio.wait_for(a.drain(), 10)

        run = await b.get(run_id)
        steps = await b.store.load_steps(run_id)
        assert (run.status, run.output) == ("completed", {"execution": 2}), "A rewrote the run's output"
        assert steps["s2"].output == {"execution": 2}, "A overwrote B's committed step record"
    finally:
        _release.set()
        await a.close()
        await b.close()
