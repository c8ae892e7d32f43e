"""The Control Tower side of the benchmark: the four workloads on ``EmbeddedEngine`` + SQLite.

Every workload opens a fresh SQLite store with ``synchronous="FULL"``; all runs of a
workload are started concurrently (the engine group-commits across concurrent runs).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.common import MemoryWatch, Result, Sizes, expect

NAME = "Control Tower"

TOOLS = {"noop": {"impl": "builtin:noop"}, "sleep": {"impl": "builtin:sleep"}}


def available() -> str | None:
    """None when the engine can be imported, else why not."""
    try:
        from controltower.engine import EmbeddedEngine  # noqa: F401
        from controltower.spec.models import WorkflowSpec  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for pkg in ("controltower", "sqlalchemy", "pydantic"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _spec(doc: dict[str, Any]) -> Any:
    from controltower.spec.models import WorkflowSpec

    return WorkflowSpec.model_validate({"tools": TOOLS, **doc})


async def _open(workdir: Path, name: str) -> Any:
    from controltower.engine import EmbeddedEngine

    path = (workdir / f"ct_{name}.db").resolve()
    return await EmbeddedEngine.open(f"sqlite:///{path}", synchronous="FULL")


async def _run_all(engine: Any, spec: Any, inputs: list[Any]) -> list[Any]:
    """Start every run concurrently and wait for all of them to finish."""
    ids = await asyncio.gather(*(engine.start(spec, input=payload) for payload in inputs))
    return list(await asyncio.gather(*(engine.wait(run_id) for run_id in ids)))


def _check_completed(infos: list[Any]) -> None:
    bad = [(i.id, i.status, i.error) for i in infos if i.status != "completed"]
    if bad:
        raise RuntimeError(f"{len(bad)} runs did not complete, e.g. {bad[0]}")


async def _check_steps(engine: Any, run_ids: list[str], expected: int) -> None:
    """After the clock stops: every run has ``expected`` completed step records in the store."""
    for run_id in run_ids:
        _, records, _ = await engine.store.load_state(run_id)
        done = sum(1 for r in records.values() if r.status == "completed")
        if done != expected:
            raise RuntimeError(f"run {run_id} has {done} completed step records, expected {expected}")


async def _warm(engine: Any, spec: Any) -> None:
    """Publish the spec outside the timed region (LangGraph compiles its graph outside it too)."""
    await engine.publish(spec)


async def w1(workdir: Path, sizes: Sizes) -> Result:
    runs, steps = sizes.w1_runs, sizes.w1_steps
    spec = _spec(
        {"name": "bench-w1", "steps": [{"id": f"s{i}", "kind": "tool", "tool": "noop"} for i in range(steps)]}
    )
    engine = await _open(workdir, "w1")
    try:
        await _warm(engine, spec)
        commits = _commits(engine)
        t0 = time.perf_counter()
        infos = await _run_all(engine, spec, [{"n": i} for i in range(runs)])
        wall = time.perf_counter() - t0
        commits = _commits(engine) - commits
        await _check_steps(engine, [i.id for i in infos], steps)
    finally:
        await engine.close()
    _check_completed(infos)
    extra = {f"SQLite commits for {runs * steps} steps": float(commits)} if commits >= 0 else {}
    return Result(
        metrics={"ms/step": wall * 1000 / (runs * steps), "wall s": wall},
        notes=[f"{runs} concurrent runs, one engine"],
        extra=extra,
    )


def _commits(engine: Any) -> int:
    """Transactions the store has committed so far (-1 when the store does not say)."""
    return int(getattr(engine.store, "commits", -1))


async def w2(workdir: Path, sizes: Sizes) -> Result:
    runs, branches = sizes.w2_runs, sizes.w2_branches
    spec = _spec(
        {
            "name": "bench-w2",
            "steps": [
                {
                    "id": "fan",
                    "kind": "parallel",
                    "map": {
                        "over": "${{ input.items }}",
                        "steps": [{"id": "b", "kind": "tool", "tool": "noop"}],
                    },
                },
                {"id": "join", "kind": "tool", "tool": "noop"},
            ],
        }
    )
    engine = await _open(workdir, "w2")
    try:
        await _warm(engine, spec)
        items = list(range(branches))
        t0 = time.perf_counter()
        infos = await _run_all(engine, spec, [{"items": items} for _ in range(runs)])
        wall = time.perf_counter() - t0
        await _check_steps(engine, [i.id for i in infos], branches + 2)  # fan + branches + join
    finally:
        await engine.close()
    _check_completed(infos)
    return Result(metrics={"wall s": wall, "ms/branch": wall * 1000 / (runs * branches)})


async def w3(workdir: Path, sizes: Sizes) -> Result:
    runs, steps, pause = sizes.w3_runs, sizes.w3_steps, sizes.w3_sleep
    spec = _spec(
        {
            "name": "bench-w3",
            "steps": [
                {"id": f"s{i}", "kind": "tool", "tool": "sleep", "input": {"seconds": pause}}
                for i in range(steps)
            ],
        }
    )
    engine = await _open(workdir, "w3")
    try:
        await _warm(engine, spec)
        t0 = time.perf_counter()
        infos = await _run_all(engine, spec, [{"n": i} for i in range(runs)])
        wall = time.perf_counter() - t0
        await _check_steps(engine, [i.id for i in infos], steps)
    finally:
        await engine.close()
    _check_completed(infos)
    return Result(metrics={"wall s": wall}, notes=[f"ideal {steps * pause:g} s"])


async def w4(workdir: Path, sizes: Sizes) -> Result:
    runs = sizes.w4_runs
    spec = _spec(
        {
            "name": "bench-w4",
            "steps": [
                {"id": "ok", "kind": "approval", "prompt": "ship?"},
                {"id": "done", "kind": "tool", "tool": "noop"},
            ],
        }
    )
    watch = MemoryWatch()
    engine = await _open(workdir, "w4")
    try:
        await _warm(engine, spec)
        watch.start()
        t0 = time.perf_counter()
        ids = await asyncio.gather(*(engine.start(spec, input={"n": i}) for i in range(runs)))
        waiting = await asyncio.gather(*(engine.wait(run_id, statuses={"waiting"}) for run_id in ids))
        park = time.perf_counter() - t0
        expect(all(w.status == "waiting" for w in waiting), "a run did not park")
        t1 = time.perf_counter()
        await asyncio.gather(*(engine.approve(run_id, "ok", by="bench") for run_id in ids))
        infos = await asyncio.gather(*(engine.wait(run_id) for run_id in ids))
        resume = time.perf_counter() - t1
        rss = watch.stop()
        _check_completed(list(infos))
        await _check_steps(engine, list(ids), 2)  # the approval + the step after it
    finally:
        await engine.close()
    return Result(
        metrics={"park s": park, "resume s": resume, "peak RSS +MiB": rss},
        notes=[watch.method],
    )


WORKLOADS = {"W1": w1, "W2": w2, "W3": w3, "W4": w4}
