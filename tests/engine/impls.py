"""Tools and agents for the engine tests, referenced as ``tests.engine.impls:NAME``.

Side effects are recorded in module-level dicts keyed by a per-test ``tag`` passed in
the step input, so tests running one after another never see each other's counts.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from controltower.engine import StepContext
from controltower.spec.errors import StepFailure

CALLS: dict[str, int] = defaultdict(int)  # "tag:name" -> executions
EVENTS: dict[str, list[str]] = defaultdict(list)  # tag -> ordered log
FLAGS: dict[str, bool] = {}  # tag -> make `gated` fail
INFLIGHT: dict[str, int] = defaultdict(int)
PEAK: dict[str, int] = defaultdict(int)
CONTEXTS: dict[str, list[StepContext]] = defaultdict(list)


def count(payload: dict[str, Any]) -> dict[str, Any]:
    """Sync: count the call, echo the payload."""
    CALLS[f"{payload['tag']}:{payload.get('name', '')}"] += 1
    return dict(payload)


def record(payload: dict[str, Any]) -> dict[str, Any]:
    EVENTS[payload["tag"]].append(str(payload["name"]))
    return {"recorded": payload["name"]}


async def track(payload: dict[str, Any]) -> dict[str, Any]:
    """Async: measure how many calls with this tag are in flight at once."""
    tag = payload["tag"]
    INFLIGHT[tag] += 1
    PEAK[tag] = max(PEAK[tag], INFLIGHT[tag])
    try:
        await asyncio.sleep(float(payload.get("seconds", 0.1)))
    finally:
        INFLIGHT[tag] -= 1
    return {"item": payload.get("item"), "done": True}


async def slow(payload: dict[str, Any]) -> dict[str, Any]:
    tag = payload["tag"]
    EVENTS[tag].append("slow:start")
    await asyncio.sleep(float(payload.get("seconds", 5)))
    EVENTS[tag].append("slow:end")
    return {"slow": True}


def flaky(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Raise until attempt ``succeed_on``; records every context it got."""
    CONTEXTS[payload["tag"]].append(ctx)
    if ctx.attempt < int(payload["succeed_on"]):
        raise RuntimeError(f"transient failure on attempt {ctx.attempt}")
    return {"attempt": ctx.attempt, "key": ctx.idempotency_key}


def business_no(payload: dict[str, Any]) -> dict[str, Any]:
    CALLS[f"{payload['tag']}:business_no"] += 1
    raise StepFailure("the customer said no")


def key_error(payload: dict[str, Any]) -> dict[str, Any]:
    CALLS[f"{payload['tag']}:key_error"] += 1
    raise KeyError("missing")


def gated(payload: dict[str, Any]) -> dict[str, Any]:
    CALLS[f"{payload['tag']}:gated"] += 1
    if FLAGS.get(payload["tag"]):
        raise RuntimeError("the flag is set")
    return {"gated": "passed"}


def bad_output(payload: dict[str, Any]) -> dict[str, Any]:
    return {"score": "not a number"}


# -- agents ------------------------------------------------------------------------------


def manager(payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "tasks": [
            {"worker": "upper", "input": {"text": part}}
            if i % 2 == 0
            else {"worker": "length", "input": {"text": part}}
            for i, part in enumerate(payload["text"].split())
        ]
    }


def bad_manager(payload: dict[str, Any]) -> dict[str, Any]:
    return {"tasks": [{"worker": "upper", "input": {"text": "a"}}, {"worker": "intruder", "input": {}}]}


def no_plan(payload: dict[str, Any]) -> dict[str, Any]:
    return {"plan": "I will not say"}


async def upper(payload: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0.01)
    return {"text": payload["text"].upper()}


def length(payload: dict[str, Any]) -> dict[str, Any]:
    return {"length": len(payload["text"])}


def combine(payload: dict[str, Any]) -> dict[str, Any]:
    return {"n": len(payload["results"]), "results": payload["results"], "asked": payload["input"]["text"]}


def draft(payload: dict[str, Any]) -> dict[str, Any]:
    """A writer whose quality grows with each revision."""
    CALLS[f"{payload['tag']}:draft"] += 1
    return {"quality": int(payload["iteration"]) * 30, "text": f"draft {payload['iteration']}"}


def split_manager(payload: dict[str, Any]) -> dict[str, Any]:
    tag = payload["tag"]
    return {
        "tasks": [{"worker": "boom", "input": {"tag": tag}}, {"worker": "slowpoke", "input": {"tag": tag}}]
    }


def boom(payload: dict[str, Any]) -> dict[str, Any]:
    raise StepFailure("worker exploded")


async def slowpoke(payload: dict[str, Any]) -> dict[str, Any]:
    EVENTS[payload["tag"]].append("slowpoke:start")
    await asyncio.sleep(0.4)
    EVENTS[payload["tag"]].append("slowpoke:done")
    return {"slow": True}
