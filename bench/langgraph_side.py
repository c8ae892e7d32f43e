"""The LangGraph side of the benchmark: the same four workloads on LangGraph + its SQLite checkpointer.

Every workload gets a fresh SQLite file with ``PRAGMA synchronous=FULL`` set on the
connection handed to the saver (the saver itself switches the file to WAL), so each
checkpoint LangGraph writes is on disk when its commit returns -- the same durability
Control Tower runs with.

LangGraph's default durability mode is used (``"async"``: a step's checkpoint is written
while the next step runs; every step is still checkpointed). W1 also measures
``durability="sync"`` and the sequential sync ``SqliteSaver``, and reports the best figure.
"""

from __future__ import annotations

import asyncio
import operator
import sqlite3
import time
from pathlib import Path
from typing import Annotated, Any, TypedDict

import aiosqlite
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, Send, interrupt

from bench.common import MemoryWatch, Result, Sizes, expect

NAME = "LangGraph"


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {
        pkg: version(pkg)
        for pkg in ("langgraph", "langgraph-checkpoint", "langgraph-checkpoint-sqlite", "aiosqlite")
    }


# -- connections -----------------------------------------------------------------------


async def _async_saver(path: Path) -> tuple[AsyncSqliteSaver, aiosqlite.Connection]:
    conn = await aiosqlite.connect(str(path))
    await conn.execute("PRAGMA synchronous=FULL")
    saver = AsyncSqliteSaver(conn)
    await saver.setup()
    await _check_pragmas(conn)
    return saver, conn


async def _check_pragmas(conn: aiosqlite.Connection) -> None:
    async with conn.execute("PRAGMA synchronous") as cur:
        row = await cur.fetchone()
    if row is None or row[0] != 2:
        raise RuntimeError(f"expected PRAGMA synchronous=FULL (2), got {row}")
    async with conn.execute("PRAGMA journal_mode") as cur:
        row = await cur.fetchone()
    if row is None or row[0] != "wal":
        raise RuntimeError(f"expected journal_mode=wal, got {row}")


def _config(thread: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread}}


# -- W1: sequential no-op steps ----------------------------------------------------------


class CountState(TypedDict):
    count: int


def _chain_graph(steps: int, node: Any) -> StateGraph[Any]:
    builder: StateGraph[Any] = StateGraph(CountState)
    previous = START
    for i in range(steps):
        builder.add_node(f"s{i}", node)
        builder.add_edge(previous, f"s{i}")
        previous = f"s{i}"
    builder.add_edge(previous, END)
    return builder


async def _anoop(state: CountState) -> dict[str, int]:
    return {"count": state["count"] + 1}


def _noop(state: CountState) -> dict[str, int]:
    return {"count": state["count"] + 1}


async def w1(workdir: Path, sizes: Sizes) -> Result:
    """``runs`` runs x ``steps`` no-op steps. Best of: concurrent async (default and sync
    durability) and sequential sync SqliteSaver."""
    runs, steps = sizes.w1_runs, sizes.w1_steps
    total_steps = runs * steps
    variants: dict[str, float] = {}

    for durability in ("async", "sync"):
        saver, conn = await _async_saver(workdir / f"lg_w1_{durability}.db")
        try:
            graph = _chain_graph(steps, _anoop).compile(checkpointer=saver)
            t0 = time.perf_counter()
            outs = await asyncio.gather(
                *(graph.ainvoke({"count": 0}, _config(f"w1-{i}"), durability=durability) for i in range(runs))
            )
            wall = time.perf_counter() - t0
        finally:
            await conn.close()
        expect(all(o["count"] == steps for o in outs), "a run skipped steps")
        variants[f"async saver, {runs} concurrent, durability={durability}"] = wall

    sync_conn = sqlite3.connect(str(workdir / "lg_w1_sync.db"), check_same_thread=False)
    try:
        sync_conn.execute("PRAGMA synchronous=FULL")
        sync_saver = SqliteSaver(sync_conn)
        sync_saver.setup()
        graph_s = _chain_graph(steps, _noop).compile(checkpointer=sync_saver)

        def sequential() -> float:
            t0 = time.perf_counter()
            for i in range(runs):
                out = graph_s.invoke({"count": 0}, _config(f"w1s-{i}"))
                expect(out["count"] == steps, "a run skipped steps")
            return time.perf_counter() - t0

        variants["sync SqliteSaver, sequential"] = await asyncio.to_thread(sequential)
    finally:
        sync_conn.close()

    best = min(variants.values())
    extra = {f"ms/step [{name}]": wall * 1000 / total_steps for name, wall in variants.items()}
    return Result(
        metrics={"ms/step": best * 1000 / total_steps, "wall s": best},
        notes=["ms/step = the fastest of the variants below in each repetition"],
        extra=extra,
    )


# -- W2: fan-out / join -------------------------------------------------------------------


class FanState(TypedDict):
    items: list[int]
    results: Annotated[list[int], operator.add]
    total: int


class BranchState(TypedDict):
    item: int


async def w2(workdir: Path, sizes: Sizes) -> Result:
    """``runs`` concurrent runs, each ``Send``-ing ``branches`` no-op branches, joined by a reducer."""
    runs, branches = sizes.w2_runs, sizes.w2_branches

    def fan_out(state: FanState) -> list[Send]:
        return [Send("branch", {"item": item}) for item in state["items"]]

    async def branch(state: BranchState) -> dict[str, list[int]]:
        return {"results": [state["item"]]}

    async def join(state: FanState) -> dict[str, int]:
        return {"total": len(state["results"])}

    builder: StateGraph[Any] = StateGraph(FanState)
    builder.add_node("branch", branch)
    builder.add_node("join", join)
    builder.add_conditional_edges(START, fan_out, ["branch"])
    builder.add_edge("branch", "join")
    builder.add_edge("join", END)

    saver, conn = await _async_saver(workdir / "lg_w2.db")
    try:
        graph = builder.compile(checkpointer=saver)
        items = list(range(branches))
        t0 = time.perf_counter()
        outs = await asyncio.gather(
            *(graph.ainvoke({"items": items, "results": []}, _config(f"w2-{i}")) for i in range(runs))
        )
        wall = time.perf_counter() - t0
    finally:
        await conn.close()
    expect(all(o["total"] == branches for o in outs), "a run lost branch results")
    return Result(metrics={"wall s": wall, "ms/branch": wall * 1000 / (runs * branches)})


# -- W3: slow steps (a stand-in for model calls) -------------------------------------------


async def w3(workdir: Path, sizes: Sizes) -> Result:
    """``runs`` concurrent runs x ``steps`` steps that each sleep ``sleep`` seconds."""
    runs, steps, pause = sizes.w3_runs, sizes.w3_steps, sizes.w3_sleep

    async def slow(state: CountState) -> dict[str, int]:
        await asyncio.sleep(pause)
        return {"count": state["count"] + 1}

    saver, conn = await _async_saver(workdir / "lg_w3.db")
    try:
        graph = _chain_graph(steps, slow).compile(checkpointer=saver)
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(graph.ainvoke({"count": 0}, _config(f"w3-{i}")) for i in range(runs)))
        wall = time.perf_counter() - t0
    finally:
        await conn.close()
    expect(all(o["count"] == steps for o in outs), "a run skipped steps")
    return Result(metrics={"wall s": wall}, notes=[f"ideal {steps * pause:g} s"])


# -- W4: park on an approval, then approve all ----------------------------------------------


class ApprovalState(TypedDict):
    approved: bool
    done: bool


async def w4(workdir: Path, sizes: Sizes) -> Result:
    """``runs`` runs parked on ``interrupt()``, then all resumed with ``Command(resume=...)``."""
    runs = sizes.w4_runs

    async def ask(state: ApprovalState) -> dict[str, bool]:
        decision = interrupt({"prompt": "ship?"})
        return {"approved": bool(decision["approved"])}

    async def finish(state: ApprovalState) -> dict[str, bool]:
        return {"done": True}

    builder: StateGraph[Any] = StateGraph(ApprovalState)
    builder.add_node("ask", ask)
    builder.add_node("finish", finish)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", "finish")
    builder.add_edge("finish", END)

    watch = MemoryWatch()
    saver, conn = await _async_saver(workdir / "lg_w4.db")
    try:
        graph = builder.compile(checkpointer=saver)
        watch.start()
        t0 = time.perf_counter()
        parked = await asyncio.gather(
            *(graph.ainvoke({"approved": False, "done": False}, _config(f"w4-{i}")) for i in range(runs))
        )
        park = time.perf_counter() - t0
        expect(all("__interrupt__" in p for p in parked), "a run did not park")
        t1 = time.perf_counter()
        outs = await asyncio.gather(
            *(graph.ainvoke(Command(resume={"approved": True}), _config(f"w4-{i}")) for i in range(runs))
        )
        resume = time.perf_counter() - t1
        rss = watch.stop()
    finally:
        await conn.close()
    expect(all(o["done"] and o["approved"] for o in outs), "a run did not finish")
    return Result(
        metrics={"park s": park, "resume s": resume, "peak RSS +MiB": rss},
        notes=[watch.method],
    )


WORKLOADS = {"W1": w1, "W2": w2, "W3": w3, "W4": w4}
