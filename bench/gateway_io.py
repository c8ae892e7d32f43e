"""Gateway overhead under the engine when the tool does I/O (it awaits a sleep), not nothing.

    .venv/bin/python bench/gateway_io.py [--delay-ms 1] [--calls 1000] [--split]

``bench/gateway.py`` times a tool that returns at once: the caller never yields to the event
loop, which is the worst case for everything the gateway defers to the store thread. Real tools
wait for a network or a disk. Here every benchmark tool awaits ``asyncio.sleep(delay)``; raw =
the same coroutine awaited alone. ``--split`` also times, for priced reads, the part of each call
before the tool, the tool itself (measured inside it) and the part after it. Results:
bench/README.md, "Budget allotments".
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import gateway as base

DELAY = 0.001
MARKS: dict[str, float] = {}


async def lookup_io(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    MARKS["tool_start"] = time.perf_counter()
    await asyncio.sleep(DELAY)
    MARKS["tool_end"] = time.perf_counter()
    return {"id": args["id"], "status": "open"}


async def update_io(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    await asyncio.sleep(DELAY)
    return {"id": args["id"], "status": "updated", "amount": args.get("amount", 0)}


SPLIT: dict[str, list[float]] = {"before the tool": [], "the tool": [], "after the tool": []}


async def split_agent(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """The engine path, with each call cut at the tool's own start and end."""
    tool = payload["tool"]
    for i in range(payload["n"]):
        started = time.perf_counter()
        out = await ctx.call_tool(tool, base.args_for(tool, i))
        ended = time.perf_counter()
        if out["status"] != "ok":
            raise RuntimeError(f"call {i} of {tool} was {out}")
        base.ENGINE_LATENCIES.append(ended - started)
        SPLIT["before the tool"].append(MARKS["tool_start"] - started)
        SPLIT["the tool"].append(MARKS["tool_end"] - MARKS["tool_start"])
        SPLIT["after the tool"].append(ended - MARKS["tool_end"])
    return {"calls": payload["n"]}


async def main(args: argparse.Namespace) -> None:
    global DELAY
    DELAY = args.delay_ms / 1000
    plain = base.tools
    base.tools = lambda: [(t, update_io if t.writes else lookup_io) for t, _ in plain()]
    raw = []
    for i in range(args.calls):
        started = time.perf_counter()
        await lookup_io({"id": str(i)}, None)
        raw.append(time.perf_counter() - started)
    r = base.summary(raw)
    print(f"tool sleeps {args.delay_ms:g} ms; raw p50 {r['p50']:.3f} ms, p99 {r['p99']:.3f} ms")
    with tempfile.TemporaryDirectory() as workdir:
        store, gateway = await base.open_bench_gateway(f"sqlite:///{workdir}/bench.db")
        if args.split:
            base.engine_agent = split_agent  # the workflow names bench.gateway:engine_agent
            base.KINDS = (("bench.lookup", "read"),)
        try:
            out = await base.measure_engine(store, gateway, args.calls, 200)
        finally:
            await store.close()
    for kind, s in out.items():
        print(
            f"engine path, SQLite FULL, {kind:<14} p50 {s['p50']:.3f}  p99 {s['p99']:.3f}  "
            f"overhead +p50 {s['p50'] - r['p50']:.3f}  +p99 {s['p99'] - r['p99']:.3f} ms  "
            f"commits/call {s['commits/call']:.2f}"
        )
    if args.split:
        for part, values in SPLIT.items():
            s = base.summary(values[200:])
            print(f"  {part:<16} p50 {s['p50']:.3f}  p99 {s['p99']:.3f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=1.0, help="what the tool awaits (ms)")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--split", action="store_true", help="time before / in / after the tool")
    asyncio.run(main(parser.parse_args()))
