"""Container steps: parallel branches and joins, map, loops, nesting and delegation."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from tests.engine import impls
from tests.engine.helpers import IMPLS, make_spec, parked, run_to_end, steps_of, tag, tool

from controltower.engine import EmbeddedEngine


def parallel(step_id: str, branches: dict[str, list[dict[str, Any]]], **extra: Any) -> dict[str, Any]:
    return {"id": step_id, "kind": "parallel", "branches": branches, **extra}


def mapped(step_id: str, over: str, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    map_spec = {"over": over, "steps": steps}
    for name in ("item", "max_concurrency"):
        if name in extra:
            map_spec[name] = extra.pop(name)
    return {"id": step_id, "kind": "parallel", "map": map_spec, **extra}


def loop(step_id: str, body: list[dict[str, Any]], until: str, **extra: Any) -> dict[str, Any]:
    return {"id": step_id, "kind": "loop", "body": body, "until": until, **extra}


# -- branches and joins -----------------------------------------------------------------------


async def test_parallel_join_all(engine: EmbeddedEngine) -> None:
    spec = make_spec(
        "par-all",
        [
            parallel(
                "par",
                {
                    "a": [tool("a1", "echo", {"v": "${{ input.n }}"})],
                    "b": [
                        tool("b1", "echo", {"w": 2}),
                        tool("b2", "echo", {"w": "${{ steps.b1.output.w * 10 }}"}),
                    ],
                },
            ),
            tool("after", "echo", {"sum": "${{ steps.par.output.a.v + steps.par.output.b.w }}"}),
        ],
    )
    run = await run_to_end(engine, spec, {"n": 1})
    assert run.status == "completed", run.error
    assert run.output == {"sum": 21}
    steps = await steps_of(engine, run.id)
    assert {"par[a]/a1", "par[b]/b1", "par[b]/b2", "par", "after"} == set(steps)
    assert steps["par"].output == {"a": {"v": 1}, "b": {"w": 20}}


async def test_parallel_join_all_fails_when_a_branch_fails(engine: EmbeddedEngine) -> None:
    spec = make_spec(
        "par-fail",
        [
            parallel(
                "par", {"a": [tool("ok", "echo", {"v": 1})], "b": [tool("bad", "fail", {"message": "boom"})]}
            )
        ],
    )
    run = await run_to_end(engine, spec)
    assert run.status == "failed"
    assert run.error is not None
    assert (run.error["step"], run.error["message"]) == ("par[b]/bad", "boom")
    assert "par" not in await steps_of(engine, run.id)


async def test_parallel_join_any_cancels_the_slow_branch(engine: EmbeddedEngine) -> None:
    t = tag()
    spec = make_spec(
        "par-any",
        [
            parallel(
                "par",
                {
                    "slow": [tool("s", "slow", {"tag": t, "seconds": 5})],
                    "fast": [tool("f", "echo", {"fast": True})],
                },
                join="any",
            )
        ],
    )
    started = time.monotonic()
    run = await run_to_end(engine, spec)
    assert time.monotonic() - started < 2
    assert run.status == "completed", run.error
    assert run.output == {"slow": None, "fast": {"fast": True}}
    steps = await steps_of(engine, run.id)
    assert steps["par[fast]/f"].status == "completed"
    assert "par[slow]/s" not in steps
    await asyncio.sleep(0.1)
    assert impls.EVENTS[t] == ["slow:start"]  # cancelled, never finished


async def test_parallel_quorum_tolerates_failures(engine: EmbeddedEngine) -> None:
    spec = make_spec(
        "quorum",
        [
            parallel(
                "par",
                {
                    "a": [tool("x", "echo", {"v": "a"})],
                    "b": [tool("x", "fail", {"message": "b broke"})],
                    "c": [tool("x", "echo", {"v": "c"})],
                },
                join="quorum",
                quorum=2,
            )
        ],
    )
    run = await run_to_end(engine, spec)
    assert run.status == "completed", run.error
    assert run.output == {"a": {"v": "a"}, "b": None, "c": {"v": "c"}}


async def test_parallel_quorum_not_reached_fails(engine: EmbeddedEngine) -> None:
    spec = make_spec(
        "quorum-fail",
        [
            parallel(
                "par",
                {
                    "a": [tool("x", "echo", {"v": "a"})],
                    "b": [tool("x", "fail", {"message": "b broke"})],
                    "c": [tool("x", "fail", {"message": "c broke"})],
                },
                join="quorum",
                quorum=2,
            )
        ],
    )
    run = await run_to_end(engine, spec)
    assert run.status == "failed"
    assert run.error is not None
    assert run.error["code"] == "join_failed"
    assert run.error["step"] == "par"
    assert "2 of 3 branches failed" in run.error["message"]


# -- map ----------------------------------------------------------------------------------------


async def test_map_with_max_concurrency(engine: EmbeddedEngine) -> None:
    t = tag()
    spec = make_spec(
        "map",
        [
            mapped(
                "m",
                "input.items",
                [tool("t", "track", {"tag": t, "item": "${{ row }}-${{ index }}", "seconds": 0.1})],
                item="row",
                max_concurrency=2,
            )
        ],
    )
    run = await run_to_end(engine, spec, {"items": ["a", "b", "c", "d", "e"]})
    assert run.status == "completed", run.error
    assert run.output == [{"item": f"{x}-{i}", "done": True} for i, x in enumerate("abcde")]
    assert impls.PEAK[t] == 2
    steps = await steps_of(engine, run.id)
    assert {f"m[{i}]/t" for i in range(5)} <= set(steps)


async def test_map_without_limit_runs_all_at_once(engine: EmbeddedEngine) -> None:
    t = tag()
    spec = make_spec(
        "map-all",
        [mapped("m", "${{ input.items }}", [tool("t", "track", {"tag": t, "item": "${{ item }}"})])],
    )
    run = await run_to_end(engine, spec, {"items": [1, 2, 3, 4]})
    assert run.status == "completed", run.error
    assert [o["item"] for o in run.output] == [1, 2, 3, 4]
    assert impls.PEAK[t] == 4


async def test_map_over_empty_list_and_non_list(engine: EmbeddedEngine) -> None:
    spec = make_spec("map-edge", [mapped("m", "input.items", [tool("t", "echo", {"v": "${{ item }}"})])])
    empty = await run_to_end(engine, spec, {"items": []})
    assert (empty.status, empty.output) == ("completed", [])
    wrong = await run_to_end(engine, spec, {"items": "abc"})
    assert wrong.status == "failed"
    assert wrong.error is not None
    assert wrong.error["code"] == "invalid_map_input"


@pytest.mark.parametrize("items", [[1], []])
async def test_map_quorum_larger_than_items_fails_clearly(engine: EmbeddedEngine, items: list[int]) -> None:
    spec = make_spec(
        "map-quorum",
        [mapped("m", "input.items", [tool("t", "echo", {"v": "${{ item }}"})], join="quorum", quorum=2)],
    )
    run_id = await engine.start(spec, {"items": items})
    run = await engine.wait(run_id, statuses={"completed", "failed", "waiting"}, timeout=5)
    assert run.status == "failed"
    assert run.error is not None
    assert run.error["code"] == "join_failed"
    assert run.error["step"] == "m"


# -- loops --------------------------------------------------------------------------------------

JUDGE = {
    "kind": "rule",
    "rules": [{"when": "input.quality >= 80", "output": {"ok": True, "score": "${{ input.quality }}"}}],
    "default": {"ok": False, "score": "${{ input.quality }}"},
}


def revise_loop(t: str, **extra: Any) -> dict[str, Any]:
    return loop(
        "improve",
        [
            tool("write", "draft", {"tag": t, "iteration": "${{ loop.iteration }}"}),
            {
                "id": "judge",
                "kind": "agent",
                "agent": "judge",
                "input": {"quality": "${{ steps.write.output.quality }}"},
            },
        ],
        "steps.judge.output.ok",
        **extra,
    )


def loop_spec(name: str, t: str, **extra: Any) -> Any:
    return make_spec(
        name,
        [revise_loop(t, **extra), tool("after", "echo", {"score": "${{ steps.improve.output.last.score }}"})],
        tools={"draft": {"impl": f"{IMPLS}:draft"}},
        agents={"judge": JUDGE},
    )


async def test_loop_evaluate_revise_until_pass(engine: EmbeddedEngine) -> None:
    t = tag()
    run = await run_to_end(engine, loop_spec("loop-pass", t, max_iterations=5))
    assert run.status == "completed", run.error
    assert run.output == {"score": 90}
    steps = await steps_of(engine, run.id)
    loop_out = steps["improve"].output
    assert (loop_out["iterations"], loop_out["passed"]) == (3, True)
    assert loop_out["steps"]["write"] == {"quality": 90, "text": "draft 3"}
    assert {"improve#1/write", "improve#2/judge", "improve#3/judge"} <= set(steps)
    assert "improve#4/write" not in steps
    assert steps["improve#2/judge"].output == {"ok": False, "score": 60}
    assert impls.CALLS[f"{t}:draft"] == 3


async def test_loop_iteration_sees_previous_feedback(engine: EmbeddedEngine) -> None:
    """Evaluate-and-revise: the writer of iteration n reads the judge's verdict of n-1."""
    t = tag()
    body = [
        tool(
            "write",
            "echo",
            {
                "tag": t,
                "feedback": "${{ steps.judge.output.score if loop.iteration > 1 else None }}",
                "previous": "${{ loop.previous.judge.output.score if loop.previous else None }}",
            },
        ),
        tool("judge", "echo", {"score": "${{ loop.iteration * 40 }}", "ok": "${{ loop.iteration >= 3 }}"}),
    ]
    spec = make_spec("loop-feedback", [loop("improve", body, "steps.judge.output.ok")])
    run = await run_to_end(engine, spec)
    assert run.status == "completed", run.error
    steps = await steps_of(engine, run.id)
    assert steps["improve#1/write"].output["feedback"] is None
    assert steps["improve#1/write"].output["previous"] is None
    assert steps["improve#2/write"].output["feedback"] == 40
    assert steps["improve#3/write"].output["previous"] == 80
    assert steps["improve"].output["iterations"] == 3


async def test_loop_exhausted_fails(engine: EmbeddedEngine) -> None:
    t = tag()
    run = await run_to_end(engine, loop_spec("loop-fail", t, max_iterations=2))
    assert run.status == "failed"
    assert run.error is not None
    assert (run.error["code"], run.error["step"]) == ("loop_exhausted", "improve")
    assert "after" not in await steps_of(engine, run.id)
    assert impls.CALLS[f"{t}:draft"] == 2


async def test_loop_exhausted_continues(engine: EmbeddedEngine) -> None:
    t = tag()
    run = await run_to_end(engine, loop_spec("loop-cont", t, max_iterations=2, on_exhausted="continue"))
    assert run.status == "completed", run.error
    assert run.output == {"score": 60}
    loop_out = (await steps_of(engine, run.id))["improve"].output
    assert (loop_out["iterations"], loop_out["passed"]) == (2, False)


async def test_parallel_nested_in_loop(engine: EmbeddedEngine) -> None:
    body = [
        parallel(
            "par",
            {
                "a": [tool("x", "echo", {"v": "${{ loop.iteration }}"})],
                "b": [tool("y", "echo", {"w": "${{ loop.iteration * 10 }}"})],
            },
        )
    ]
    spec = make_spec("loop-par", [loop("lp", body, "steps.par.output.b.w >= 20", max_iterations=5)])
    run = await run_to_end(engine, spec)
    assert run.status == "completed", run.error
    assert run.output["iterations"] == 2
    assert run.output["last"] == {"a": {"v": 2}, "b": {"w": 20}}
    steps = await steps_of(engine, run.id)
    assert {"lp#1/par[a]/x", "lp#1/par[b]/y", "lp#1/par", "lp#2/par[a]/x", "lp#2/par", "lp"} <= set(steps)
    assert steps["lp#1/par[a]/x"].output == {"v": 1}
    assert "lp#3/par" not in steps


async def test_approval_in_parallel_in_loop_replays(engine: EmbeddedEngine) -> None:
    t = tag()
    body = [
        parallel(
            "par",
            {
                "gate": [{"id": "ok", "kind": "approval"}],
                "work": [tool("w", "count", {"tag": t, "name": "work", "i": "${{ loop.iteration }}"})],
            },
        )
    ]
    spec = make_spec("loop-appr", [loop("lp", body, "loop.iteration >= 2", max_iterations=3)])
    run_id = await engine.start(spec)
    await parked(engine, run_id)
    assert await engine.approve(run_id, "ok", by="ann") == "lp#1/par[gate]/ok"
    await parked(engine, run_id)
    assert await engine.approve(run_id, "ok", by="bob") == "lp#2/par[gate]/ok"
    run = await engine.wait(run_id, timeout=5)
    assert run.status == "completed", run.error
    assert run.output["iterations"] == 2
    assert run.output["last"]["gate"]["by"] == "bob"
    assert impls.CALLS[f"{t}:work"] == 2  # one execution per iteration despite replays


async def test_loop_nested_in_map(engine: EmbeddedEngine) -> None:
    t = tag()
    inner = loop(
        "lp",
        [tool("c", "count", {"tag": t, "name": "${{ n }}-${{ loop.iteration }}"})],
        "loop.iteration >= n",
        max_iterations=5,
    )
    spec = make_spec("map-loop", [mapped("m", "input.items", [inner], item="n")])
    run = await run_to_end(engine, spec, {"items": [1, 2, 3]})
    assert run.status == "completed", run.error
    assert [o["iterations"] for o in run.output] == [1, 2, 3]
    assert run.output[2]["last"]["name"] == "3-3"
    steps = await steps_of(engine, run.id)
    assert {"m[0]/lp#1/c", "m[1]/lp#2/c", "m[2]/lp#3/c", "m[2]/lp"} <= set(steps)
    assert "m[0]/lp#2/c" not in steps
    assert sum(v for k, v in impls.CALLS.items() if k.startswith(t)) == 6


# -- delegate -----------------------------------------------------------------------------------

AGENTS = {
    name: {"kind": "python", "impl": f"{IMPLS}:{name}"}
    for name in ("manager", "bad_manager", "no_plan", "upper", "length", "combine")
}


def delegate(manager: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": "del",
        "kind": "delegate",
        "manager": manager,
        "workers": ["upper", "length"],
        "input": {"text": "${{ input.text }}"},
        **extra,
    }


async def test_delegate_manager_workers_combine(engine: EmbeddedEngine) -> None:
    spec = make_spec("deleg", [delegate("manager", combine="combine")], agents=AGENTS)
    run = await run_to_end(engine, spec, {"text": "alpha beta gamma"})
    assert run.status == "completed", run.error
    assert run.output == {
        "n": 3,
        "results": [{"text": "ALPHA"}, {"length": 4}, {"text": "GAMMA"}],
        "asked": "alpha beta gamma",
    }
    steps = await steps_of(engine, run.id)
    assert {"del/manager", "del/task[0]", "del/task[1]", "del/task[2]", "del/combine", "del"} == set(steps)
    assert steps["del/task[1]"].input == {"text": "beta"}


async def test_delegate_without_combine(engine: EmbeddedEngine) -> None:
    spec = make_spec("deleg-plain", [delegate("manager")], agents=AGENTS)
    run = await run_to_end(engine, spec, {"text": "ab cde"})
    assert run.status == "completed", run.error
    assert run.output["results"] == [{"text": "AB"}, {"length": 3}]
    assert [task["worker"] for task in run.output["tasks"]] == ["upper", "length"]


@pytest.mark.parametrize(("manager", "needle"), [("bad_manager", "'intruder'"), ("no_plan", "must return")])
async def test_delegate_invalid_plan_fails_clearly(engine: EmbeddedEngine, manager: str, needle: str) -> None:
    spec = make_spec(f"deleg-{manager.replace('_', '-')}", [delegate(manager)], agents=AGENTS)
    run = await run_to_end(engine, spec, {"text": "a b"})
    assert run.status == "failed"
    assert run.error is not None
    assert (run.error["code"], run.error["step"]) == ("invalid_delegation", "del")
    assert needle in run.error["message"]
    steps = await steps_of(engine, run.id)
    assert steps["del"].status == "failed"
    assert not any(key.startswith("del/task") for key in steps)
