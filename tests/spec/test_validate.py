"""Semantic checks: references, control flow, expressions and schemas, each located to a line."""

from __future__ import annotations

import textwrap

import pytest

from controltower.spec import (
    SpecError,
    SpecIssue,
    WorkflowSpec,
    load_spec_data,
    load_spec_text,
    semantic_issues,
)
from controltower.spec.validate import join_path, split_path

HEAD = """\
name: t
agents:
  bot: {kind: python, impl: "m:f"}
tools:
  echo: {impl: "builtin:echo"}
steps:
"""


def issues_of(steps: str, extra: str = "") -> tuple[str, list[SpecIssue]]:
    """Load HEAD + steps (+ top-level extra); return the text (for line markers) and the issues."""
    text = HEAD + textwrap.indent(textwrap.dedent(steps).strip("\n"), "  ") + "\n" + textwrap.dedent(extra)
    with pytest.raises(SpecError) as info:
        load_spec_text(text, file="t.yaml")
    return text, info.value.issues


def loads(steps: str, extra: str = "") -> None:
    text = HEAD + textwrap.indent(textwrap.dedent(steps).strip("\n"), "  ") + "\n" + textwrap.dedent(extra)
    load_spec_text(text)


def line_of(text: str, marker: str) -> int:
    found = [n for n, line in enumerate(text.splitlines(), 1) if marker in line]
    assert len(found) == 1, f"marker {marker!r} found on lines {found}"
    return found[0]


def one(steps: str, extra: str = "") -> tuple[str, SpecIssue]:
    text, issues = issues_of(steps, extra)
    assert len(issues) == 1, [issue.render() for issue in issues]
    return text, issues[0]


# -- step ids and references --------------------------------------------------------


def test_duplicate_ids_across_nesting() -> None:
    text, issue = one(
        """
        - {id: a, kind: tool, tool: echo}
        - id: lp
          kind: loop
          until: "True"
          body:
            - {id: a, kind: tool, tool: echo}  # dup
        """
    )
    assert issue.path == "steps[1].body[0].id"
    assert issue.line == line_of(text, "# dup")
    assert issue.message == "duplicate step id 'a'"
    assert issue.hint is not None
    assert "first used at steps[0]" in issue.hint


@pytest.mark.parametrize(
    ("field", "path"),
    [
        ("next: sedn", "steps[0].next"),
        ("routes: [{when: 'True', goto: sedn}]", "steps[0].routes[0].goto"),
        ("routes: [{when: 'True', goto: send}]\n  default: sedn", "steps[0].default"),
    ],
)
def test_jump_targets_must_exist(field: str, path: str) -> None:
    kind = "route" if "routes" in field else "tool\n  tool: echo"
    text, issue = one(
        f"- id: first\n  kind: {kind}\n  {field}  # here\n- {{id: send, kind: tool, tool: echo}}"
    )
    assert issue.path == path
    assert issue.message == "'sedn' is not a step in the same list"
    assert issue.hint == "did you mean 'send'?; or use 'end'"
    assert issue.line == line_of(text, "sedn")


def test_jump_target_must_be_in_the_same_list() -> None:
    text, issue = one(
        """
        - id: lp
          kind: loop
          until: "True"
          body:
            - {id: inner, kind: tool, tool: echo, next: outer}  # here
        - {id: outer, kind: tool, tool: echo}
        """
    )
    assert issue.path == "steps[0].body[0].next"
    assert issue.line == line_of(text, "# here")


def test_end_and_forward_jumps_are_fine() -> None:
    loads(
        """
        - id: r
          kind: route
          routes: [{when: input.x, goto: c}]
          default: b
        - {id: b, kind: tool, tool: echo, next: end}
        - {id: c, kind: tool, tool: echo}
        """
    )


@pytest.mark.parametrize(
    ("steps", "path", "chain"),
    [
        (
            """
            - {id: a, kind: tool, tool: echo}
            - {id: b, kind: tool, tool: echo, next: a}  # here
            """,
            "steps[1].next",
            "'a' -> 'b' -> 'a'",
        ),
        (
            """
            - {id: a, kind: tool, tool: echo, next: a}  # here
            """,
            "steps[0].next",
            "'a' -> 'a'",
        ),
        (
            """
            - {id: a, kind: tool, tool: echo}
            - id: r
              kind: route
              routes:
                - {when: steps.a.output.retry, goto: a}  # here
              default: done
            - {id: done, kind: tool, tool: echo}
            """,
            "steps[1].routes[0].goto",
            "'a' -> 'r' -> 'a'",
        ),
    ],
)
def test_cycle_without_loop(steps: str, path: str, chain: str) -> None:
    text, issue = one(steps)
    assert issue.path == path
    assert issue.message == f"cycle without a loop: {chain}"
    assert issue.hint is not None
    assert "`loop` step" in issue.hint
    assert issue.line == line_of(text, "# here")


def test_backward_jump_that_cannot_come_back_is_not_a_cycle() -> None:
    # b jumps back to a, but a routes straight past b: a dead stretch, not a cycle.
    text, issue = one(
        """
        - id: a
          kind: route
          routes: [{when: "True", goto: c}]
        - {id: b, kind: tool, tool: echo, next: a}  # dead
        - {id: c, kind: tool, tool: echo}
        """
    )
    assert issue.path == "steps[1]"
    assert issue.line == line_of(text, "# dead")


def test_unreachable_step_reports_only_the_head() -> None:
    text, issue = one(
        """
        - {id: a, kind: tool, tool: echo, next: end}
        - {id: orphan, kind: tool, tool: echo}  # here
        - {id: after, kind: tool, tool: echo}
        """
    )
    assert issue.path == "steps[1]"
    assert issue.message == "step 'orphan' can never run: nothing leads to it"
    assert issue.hint is not None
    assert issue.hint.startswith("'a' continues to 'end'")
    assert issue.line == line_of(text, "# here")


def test_step_after_route_with_default_end_is_unreachable() -> None:
    _, issue = one(
        """
        - id: r
          kind: route
          routes: [{when: input.x, goto: c}]
        - {id: b, kind: tool, tool: echo}
        - {id: c, kind: tool, tool: echo}
        """
    )
    assert issue.path == "steps[1]"
    assert issue.hint is not None
    assert "route 'r' goes only to its gotos and default" in issue.hint


def test_next_on_route_is_flagged() -> None:
    text, issue = one(
        """
        - id: r
          kind: route
          routes: [{when: input.x, goto: b}]
          default: b
          next: b  # here
        - {id: b, kind: tool, tool: echo}
        """
    )
    assert (issue.path, issue.line) == ("steps[0].next", line_of(text, "# here"))


@pytest.mark.parametrize(
    ("step", "path", "message"),
    [
        ("{id: s, kind: agent, agent: bto}", "steps[0].agent", "agent 'bto' is not declared under `agents:`"),
        ("{id: s, kind: tool, tool: ecoh}", "steps[0].tool", "tool 'ecoh' is not declared under `tools:`"),
        (
            "{id: s, kind: delegate, manager: bto, workers: [bot]}",
            "steps[0].manager",
            "agent 'bto' is not declared under `agents:`",
        ),
        (
            "{id: s, kind: delegate, manager: bot, workers: [bot, bto]}",
            "steps[0].workers[1]",
            "agent 'bto' is not declared under `agents:`",
        ),
        (
            "{id: s, kind: delegate, manager: bot, workers: [bot], combine: bto}",
            "steps[0].combine",
            "agent 'bto' is not declared under `agents:`",
        ),
        (
            "{id: s, kind: tool, tool: echo, compensate: {tool: ecoh}}",
            "steps[0].compensate.tool",
            "tool 'ecoh' is not declared under `tools:`",
        ),
        (
            "{id: s, kind: tool, tool: echo, compensate: {agent: bto}}",
            "steps[0].compensate.agent",
            "agent 'bto' is not declared under `agents:`",
        ),
    ],
)
def test_agents_and_tools_must_be_declared(step: str, path: str, message: str) -> None:
    _, issue = one(f"- {step}")
    assert (issue.path, issue.message) == (path, message)
    assert issue.hint in ("did you mean 'bot'?", "did you mean 'echo'?")
    assert issue.line == 7


def test_builtin_looking_tool_names_still_need_declaring() -> None:
    _, issue = one("- {id: s, kind: tool, tool: noop}")
    assert issue.hint == "known tools: echo"


# -- expressions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "extra", "path"),
    [
        ("- {id: r, kind: route, routes: [{when: 'x >', goto: end}]}", "", "steps[0].routes[0].when"),
        (
            "- {id: l, kind: loop, until: 'a b', body: [{id: s, kind: tool, tool: echo}]}",
            "",
            "steps[0].until",
        ),
        (
            "- {id: m, kind: parallel, map: {over: '[1,', steps: [{id: s, kind: tool, tool: echo}]}}",
            "",
            "steps[0].map.over",
        ),
        ("- {id: s, kind: tool, tool: echo, input: {a: '${{ 1 + }}'}}", "", "steps[0].input.a"),
        ("- {id: s, kind: tool, tool: echo, input: 'x ${{ (( }}'}", "", "steps[0].input"),
        ("- {id: s, kind: tool, tool: echo}", "output: {r: '${{ ) }}'}\n", "output.r"),
        (
            "- {id: s, kind: tool, tool: echo}",
            "kpis: [{name: k, measure: 'output.x >'}]\n",
            "kpis[0].measure",
        ),
    ],
)
def test_expressions_must_parse(steps: str, extra: str, path: str) -> None:
    _, issue = one(steps, extra)
    assert issue.path == path
    assert issue.message.startswith("cannot parse expression")
    assert issue.hint is not None
    assert "Python-like" in issue.hint


def test_blank_template_expression() -> None:
    _, issue = one("- {id: s, kind: tool, tool: echo, input: {a: '${{   }}'}}")
    assert (issue.path, issue.message) == ("steps[0].input.a", "empty expression")


def test_unknown_root_name_with_hint() -> None:
    text, issue = one(
        """
        - id: s
          kind: tool
          tool: echo
          input:
            a: "${{ inptu.x }}"  # here
        """
    )
    assert issue.path == "steps[0].input.a"
    assert issue.message == "expression 'inptu.x' uses unknown name 'inptu'"
    assert issue.hint == "did you mean 'input'?"
    assert issue.line == line_of(text, "# here")


def test_names_are_scoped_to_map_loop_and_kpis() -> None:
    loads(
        """
        - id: m
          kind: parallel
          map:
            over: input.rows
            item: row
            steps:
              - id: per_row
                kind: tool
                tool: echo
                input: {v: "${{ row.v }}", at: "${{ index }}", run: "${{ run.id }}", e: "${{ env }}"}
        - id: lp
          kind: loop
          until: loop.iteration > 2
          body:
            - {id: inner, kind: tool, tool: echo, input: {n: "${{ loop.iteration }}"}}
        - id: s
          kind: tool
          tool: echo
          input: {all: "${{ [x * 2 for x in input.xs if x] }}", n: "${{ len(input.xs) }}"}
          compensate: {tool: echo, input: {was: "${{ this.output }}"}}
        """,
        "kpis: [{name: k, measure: 'output.ok and input.x'}]\n",
    )
    text, issues = issues_of(
        """
        - id: m
          kind: parallel
          map: {over: row, item: row, steps: [{id: s1, kind: tool, tool: echo}]}  # over
        - {id: s2, kind: tool, tool: echo, input: {i: "${{ loop.iteration }}"}}  # loop
        - {id: s3, kind: tool, tool: echo, input: {o: "${{ output }}"}}  # output
        """
    )
    got = {(issue.path, issue.line): issue.message for issue in issues}
    assert got == {
        ("steps[0].map.over", line_of(text, "# over")): "expression 'row' uses unknown name 'row'",
        ("steps[1].input.i", line_of(text, "# loop")): "expression 'loop.iteration' uses unknown name 'loop'",
        ("steps[2].input.o", line_of(text, "# output")): "expression 'output' uses unknown name 'output'",
    }


def test_rule_agents_see_only_their_input() -> None:
    extra = 'rules: [{when: "steps.x.ok", output: {a: "${{ input.a }}"}}]'
    text = (
        f"name: t\nagents:\n  r: {{kind: rule, {extra}}}  # rule\nsteps: [{{id: a, kind: agent, agent: r}}]\n"
    )
    with pytest.raises(SpecError) as info:
        load_spec_text(text)
    [issue] = info.value.issues
    assert issue.path == "agents.r.rules[0].when"
    assert issue.message == "expression 'steps.x.ok' uses unknown name 'steps'"
    assert issue.line == 3


def test_unknown_function() -> None:
    _, issue = one("- {id: s, kind: tool, tool: echo, input: {a: '${{ lowr(input.x) }}'}}")
    assert issue.message == "expression 'lowr(input.x)' calls unknown function 'lowr'"
    assert issue.hint == "did you mean 'lower'?"


@pytest.mark.parametrize("ref", ["steps.clasify.output", "steps['clasify']", "get(steps, 'clasify')"])
def test_unknown_step_reference(ref: str) -> None:
    _, issue = one(
        f"""
        - {{id: classify, kind: tool, tool: echo}}
        - {{id: s, kind: tool, tool: echo, input: {{a: "${{{{ {ref} }}}}"}}}}
        """
    )
    assert issue.path == "steps[1].input.a"
    assert issue.message == f"expression {ref!r} refers to unknown step 'clasify'"
    assert issue.hint == "did you mean 'classify'?"


def test_nested_step_ids_are_known_everywhere() -> None:
    loads(
        """
        - id: lp
          kind: loop
          until: steps.inner.output.ok
          body: [{id: inner, kind: tool, tool: echo}]
        - {id: s, kind: tool, tool: echo, input: {a: "${{ steps.inner.output }}"}}
        """
    )


# -- JSON Schema ----------------------------------------------------------------------------


def test_invalid_input_schema_points_inside_the_schema() -> None:
    text, issue = one(
        "- {id: s, kind: tool, tool: echo}",
        """
        input_schema:
          type: object
          properties:
            n:
              type: integr  # here
        """,
    )
    assert issue.path == "input_schema.properties.n.type"
    assert issue.message.startswith("invalid JSON Schema: 'integr' is not valid")
    assert issue.line == line_of(text, "# here")


@pytest.mark.parametrize(
    ("section", "name", "value", "path"),
    [
        ("tools", "echo", {"input_schema": {"type": 5}}, "tools.echo.input_schema.type"),
        ("tools", "echo", {"output_schema": {"required": "x"}}, "tools.echo.output_schema.required"),
        (
            "agents",
            "bot",
            {"kind": "python", "impl": "m:f", "output_schema": {"minimum": "a"}},
            "agents.bot.output_schema.minimum",
        ),
    ],
)
def test_tool_and_agent_schemas_are_checked(
    section: str, name: str, value: dict[str, object], path: str
) -> None:
    data: dict[str, object] = {
        "name": "t",
        "agents": {"bot": {"kind": "python", "impl": "m:f"}},
        "tools": {"echo": {}},
        "steps": [{"id": "s", "kind": "tool", "tool": "echo"}],
    }
    data[section] = {name: value}
    issues = semantic_issues(load_spec_data_unchecked(data))
    assert [issue.path for issue in issues] == [path]
    assert issues[0].message.startswith("invalid JSON Schema: ")
    assert (issues[0].file, issues[0].line) == (None, None)


def test_step_output_schema_and_unknown_dialect() -> None:
    text, issues = issues_of(
        """
        - id: s
          kind: tool
          tool: echo
          output_schema: {type: [string, 1]}  # step
        """,
        """
        input_schema:
          $schema: https://example.com/not-a-dialect  # dialect
        """,
    )
    got = {issue.path: issue.line for issue in issues}
    assert got == {
        "steps[0].output_schema.type": line_of(text, "# step"),
        'input_schema["$schema"]': line_of(text, "# dialect"),
    }


def test_known_dialect_is_accepted() -> None:
    loads(
        "- {id: s, kind: tool, tool: echo}",
        "input_schema: {$schema: 'http://json-schema.org/draft-07/schema#', type: object}\n",
    )


# -- everything at once ----------------------------------------------------------------------


def test_all_semantic_issues_are_reported_together() -> None:
    text, issues = issues_of(
        """
        - {id: a, kind: agent, agent: nobody}  # agent
        - {id: a, kind: tool, tool: echo}  # dup
        - {id: c, kind: tool, tool: echo, input: {x: "${{ steps.zz.output }}"}}  # ref
        - {id: d, kind: tool, tool: echo, next: nowhere}  # next
        - id: r
          kind: route
          routes: [{when: "input.x ==", goto: end}]  # when
        """,
        "output: '${{ nme }}'  # output\n",
    )
    got = {(issue.path, issue.line) for issue in issues}
    assert got == {
        ("steps[0].agent", line_of(text, "# agent")),
        ("steps[1].id", line_of(text, "# dup")),
        ("steps[2].input.x", line_of(text, "# ref")),
        ("steps[3].next", line_of(text, "# next")),
        ("steps[4].routes[0].when", line_of(text, "# when")),
        ("output", line_of(text, "# output")),
    }
    assert len(issues) == len(got)


def test_semantic_issues_carry_paths_only() -> None:
    spec = load_spec_data_unchecked(
        {
            "name": "t",
            "steps": [{"id": "a", "kind": "tool", "tool": "x"}, {"id": "a", "kind": "wait", "event": "e"}],
        }
    )
    issues = semantic_issues(spec)
    assert [issue.path for issue in issues] == ["steps[1].id", "steps[0].tool"]
    assert all(issue.line is None and issue.file is None for issue in issues)


def test_good_specs_have_no_semantic_issues() -> None:
    spec = load_spec_data({"name": "t", "steps": [{"id": "w", "kind": "wait", "duration": 1}]})
    assert semantic_issues(spec) == []


@pytest.mark.parametrize(
    "parts",
    [
        ["steps", 2, "routes", 0, "goto"],
        ["tools", "builtin.echo", "input_schema", "properties", "a b", "type"],
        ["input_schema", "$schema"],
        ["labels", 'quo"te', 0],
        [],
    ],
)
def test_paths_round_trip(parts: list[str | int]) -> None:
    assert split_path(join_path(parts)) == parts


def test_path_format() -> None:
    assert join_path(["steps", 2, "routes", 0, "goto"]) == "steps[2].routes[0].goto"
    assert join_path(["tools", "a.b", "impl"]) == 'tools["a.b"].impl'


def load_spec_data_unchecked(data: dict[str, object]) -> WorkflowSpec:
    """Model validation only, so semantic_issues can be called on a spec with semantic problems."""
    return WorkflowSpec.model_validate(data)


# -- model errors and semantic issues together ---------------------------------------------------


def test_model_and_semantic_issues_come_together() -> None:
    text, issues = issues_of(
        """
        - {id: a, kind: tool, tool: missing_tool}  # tool
        - id: b
          kind: route
          routes: [{when: input.x > 1, goto: nowhere}]  # goto
        - {id: c, kind: teleport}  # kind
        """
    )
    assert {(issue.path, issue.line) for issue in issues} == {
        ("steps[0].tool", line_of(text, "# tool")),
        ("steps[1].routes[0].goto", line_of(text, "# goto")),
        ("steps[2].kind", line_of(text, "# kind")),
    }
    assert len(issues) == 3


def test_broken_steps_keep_their_ids_for_references_and_duplicates() -> None:
    _, issues = issues_of(
        """
        - {id: a, kind: tool, tool: echo, retry: {max_attempts: 0}}  # model
        - id: lp
          kind: loop
          body: [{id: inner, kind: tool, tool: echo}]  # no until
        - {id: a, kind: tool, tool: echo, input: {x: "${{ steps.a.x }} ${{ steps.inner }} ${{ steps.zz }}"}}
        """
    )
    assert {(issue.path, issue.message) for issue in issues} == {
        ("steps[0].retry.max_attempts", "Input should be greater than or equal to 1"),
        ("steps[1].until", "missing required field 'until'"),
        ("steps[2].id", "duplicate step id 'a'"),
        ("steps[2].input.x", "expression 'steps.zz' refers to unknown step 'zz'"),
    }


def test_broken_route_does_not_make_its_targets_look_dead() -> None:
    _, issues = issues_of(
        """
        - id: r
          kind: route
          routes: [{when: "x >", goto: c}]
          defualt: c
        - {id: b, kind: tool, tool: echo, next: end}
        - {id: c, kind: tool, tool: echo}
        """
    )
    assert [issue.path for issue in issues] == ["steps[0].defualt"]


def test_structural_breakage_reports_model_issues_only() -> None:
    text = "name: t\nsteps: {a: 1}\noutput: '${{ nope }}'\n"
    with pytest.raises(SpecError) as info:
        load_spec_text(text)
    assert [issue.path for issue in info.value.issues] == ["steps"]


def test_broken_route_adds_no_fall_through_edge() -> None:
    # Falling through r -> b would close a -> r -> b -> a, a cycle the author never wrote.
    _, issues = issues_of(
        """
        - {id: a, kind: tool, tool: echo}
        - id: r
          kind: route
          routes: [{when: 1, goto: c}]
          default: c
        - {id: b, kind: tool, tool: echo, next: a}
        - {id: c, kind: tool, tool: echo}
        """
    )
    assert [issue.path for issue in issues] == ["steps[1].routes[0].when"]


def test_errors_inside_a_broken_container_still_salvage() -> None:
    _, issues = issues_of(
        """
        - id: lp
          kind: loop
          body:
            - {id: inner, kind: tool, tool: echo, bogus: 1}
        - {id: after, kind: tool, tool: ecoh, input: {x: "${{ steps.inner.output }}"}}
        """
    )
    assert {issue.path for issue in issues} == {"steps[0].until", "steps[0].body[0].bogus", "steps[1].tool"}


def test_a_wait_step_named_like_the_placeholder_is_still_checked() -> None:
    _, issues = issues_of(
        """
        - {id: w, kind: wait, event: invalid, input: {x: "${{ nope }}"}, bogus: 1}
        - {id: v, kind: wait, event: invalid, input: {x: "${{ nope }}"}}
        """
    )
    assert {issue.path for issue in issues} == {"steps[0].bogus", "steps[1].input.x"}


def test_agent_as_tool_must_name_a_declared_agent() -> None:
    text = """\
name: t
agents:
  boss: {kind: llm, offline: "m:f", tools: ["agent:helpr", "agent:boss"]}
  helper: {kind: python, impl: "m:f"}
steps:
  - {id: a, kind: agent, agent: boss}
"""
    with pytest.raises(SpecError) as info:
        load_spec_text(text, file="t.yaml")
    messages = {issue.path: issue for issue in info.value.issues}
    assert set(messages) == {"agents.boss.tools[0]", "agents.boss.tools[1]"}
    assert "helper" in (messages["agents.boss.tools[0]"].hint or "")
    assert "itself" in messages["agents.boss.tools[1]"].message
