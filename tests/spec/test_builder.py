"""The Python builder yields exactly the spec its YAML twin does, and fails the same way."""

from __future__ import annotations

from pathlib import Path

import pytest

from controltower.spec import (
    SpecError,
    Workflow,
    agent_step,
    approval,
    delegate,
    load_spec_file,
    load_spec_text,
    loop,
    parallel,
    route,
    subworkflow,
    tool_step,
    wait,
)
from controltower.spec.models import Owner

FIXTURES = Path(__file__).parent / "fixtures"


def all_kinds() -> Workflow:
    """tests/spec/fixtures/all_kinds.yaml, written with the builder."""
    return (
        Workflow("all-kinds", owner="platform", title="All step kinds")
        .trigger("manual")
        .trigger("cron", schedule="0 8 * * 1-5")
        .set(
            input_schema={
                "type": "object",
                "required": ["items"],
                "properties": {"items": {"type": "array"}},
            }
        )
        .agent(
            "classifier",
            kind="rule",
            rules=[
                {
                    "when": 'contains(lower(input.text), "refund")',
                    "output": {"category": "billing", "score": 0.9},
                }
            ],
            default={"category": "other", "score": 0.1},
        )
        .agent("manager", kind="python", impl="agents:manage")
        .agent("worker", kind="python", impl="agents:work")
        .tool("echo", impl="builtin:echo")
        .tool("undo", impl="builtin:echo", side_effect="write")
        .step(
            agent_step("classify", "classifier", input={"text": "${{ input.text }}"}),
            route("triage", [("steps.classify.output.score > 0.5", "fan_out")], default="review"),
            approval("review", "Go on?", sla="4h", on_timeout="reject"),
            parallel(
                "fan_out",
                map_over="input.items",
                item="ticket",
                steps=[
                    tool_step("handle", "echo", input={"ticket": "${{ ticket }}", "position": "${{ index }}"})
                ],
            ),
            parallel(
                "both",
                {
                    "left": [tool_step("left_echo", "echo")],
                    "right": [
                        tool_step(
                            "right_echo", "echo", retry={"max_attempts": 3, "initial_interval": "200ms"}
                        )
                    ],
                },
            ),
            loop(
                "refine",
                [tool_step("draft", "echo", input={"attempt": "${{ loop.iteration }}"})],
                until="loop.iteration >= 2 or steps.draft.output.ok",
                max_iterations=4,
            ),
            delegate("split", "manager", ["worker"], combine="manager"),
            wait("pause", duration="5m", event="go", on_timeout="continue"),
            subworkflow("child", "other.yaml"),
        )
        .step(
            tool_step(
                "send",
                "echo",
                timeout="30s",
                input={"sent": "${{ steps.classify.output.category }}"},
                compensate={"tool": "undo", "input": {"what": "${{ this.output }}"}},
                next="end",
            )
        )
        .set(output={"category": "${{ steps.classify.output.category }}"})
        .kpi("billing_rate", 'output.category == "billing"', aggregate="rate")
    )


def test_builder_equals_yaml() -> None:
    from_yaml = load_spec_file(FIXTURES / "all_kinds.yaml")
    built = all_kinds().build()
    assert built == from_yaml
    assert built.model_dump() == from_yaml.model_dump()


def test_builder_differs_when_a_detail_differs() -> None:
    # Guards the equality test above against comparing something trivially equal.
    changed = all_kinds().kpi("another", "output.x").build()
    assert changed != load_spec_file(FIXTURES / "all_kinds.yaml")


def test_owner_string_means_team() -> None:
    spec = Workflow("w", owner="support").tool("t").step(tool_step("a", "t")).build()
    assert spec.owner == Owner(team="support")
    spec = (
        Workflow("w", owner={"team": "x", "email": "x@example.com"})
        .tool("t")
        .step(tool_step("a", "t"))
        .build()
    )
    assert spec.owner == Owner(team="x", email="x@example.com")


def test_route_accepts_a_mapping() -> None:
    step = route("r", {"input.a": "x", "input.b": "y"})
    assert step == {
        "id": "r",
        "kind": "route",
        "routes": [{"when": "input.a", "goto": "x"}, {"when": "input.b", "goto": "y"}],
    }


def test_unset_options_are_left_out() -> None:
    assert tool_step("a", "t") == {"id": "a", "kind": "tool", "tool": "t"}
    assert wait("w", event="e") == {"id": "w", "kind": "wait", "event": "e"}


def test_to_dict_is_a_copy() -> None:
    wf = Workflow("w").tool("t").step(tool_step("a", "t", input={"x": 1}))
    data = wf.to_dict()
    data["steps"][0]["input"]["x"] = 2
    assert wf.to_dict()["steps"][0]["input"] == {"x": 1}


def test_build_reports_the_same_issues_as_yaml() -> None:
    wf = (
        Workflow("broken")
        .tool("t")
        .step(tool_step("a", "tt"), tool_step("a", "t", input={"v": "${{ inptu.x }}"}, next="nowhere"))
    )
    with pytest.raises(SpecError) as built:
        wf.build()
    yaml_text = """
name: broken
tools: {t: {}}
steps:
  - {id: a, kind: tool, tool: tt}
  - {id: a, kind: tool, tool: t, input: {v: "${{ inptu.x }}"}, next: nowhere}
"""
    with pytest.raises(SpecError) as loaded:
        load_spec_text(yaml_text)
    built_issues = {(i.path, i.message, i.hint) for i in built.value.issues}
    assert built_issues == {(i.path, i.message, i.hint) for i in loaded.value.issues}
    assert {path for path, _, _ in built_issues} == {
        "steps[0].tool",
        "steps[1].id",
        "steps[1].input.v",
        "steps[1].next",
    }
    assert all(i.line is None for i in built.value.issues)


def test_build_reports_model_errors_too() -> None:
    with pytest.raises(SpecError) as info:
        Workflow("w").step(parallel("p", map_over="input.xs")).build()
    [issue] = info.value.issues
    assert issue.path == "steps[0].map.steps"
    assert issue.message == "missing required field 'steps'"
