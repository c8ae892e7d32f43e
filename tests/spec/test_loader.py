"""Loading: YAML and data -> WorkflowSpec, and every failure as located SpecIssues."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from controltower.spec import (
    STEP_KINDS,
    SpecError,
    SpecIssue,
    WorkflowSpec,
    load_spec_data,
    load_spec_file,
    load_spec_text,
    loader,
)
from controltower.spec.models import LoopStep, ParallelStep, RouteStep, WaitStep

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parents[2]


def issues_of(text: str) -> list[SpecIssue]:
    with pytest.raises(SpecError) as info:
        load_spec_text(textwrap.dedent(text), file="spec.yaml")
    return info.value.issues


def line_of(text: str, marker: str) -> int:
    """1-based line of the only line containing ``marker``: tests say where, not a number."""
    found = [n for n, line in enumerate(textwrap.dedent(text).splitlines(), 1) if marker in line]
    assert len(found) == 1, f"marker {marker!r} found on lines {found}"
    return found[0]


def only(issues: list[SpecIssue], path: str) -> SpecIssue:
    matching = [issue for issue in issues if issue.path == path]
    assert len(matching) == 1, f"want one issue at {path!r}, got {[i.render() for i in issues]}"
    return matching[0]


# -- good specs ---------------------------------------------------------------------


def test_fixture_with_every_step_kind_loads() -> None:
    spec = load_spec_file(FIXTURES / "all_kinds.yaml")
    assert spec.name == "all-kinds"
    assert {step.kind for step in spec.steps} == set(STEP_KINDS)
    route = spec.steps[1]
    assert isinstance(route, RouteStep)
    assert (route.routes[0].goto, route.default) == ("fan_out", "review")
    wait = spec.steps[7]
    assert isinstance(wait, WaitStep)
    assert wait.duration == 300.0
    both = spec.steps[4]
    assert isinstance(both, ParallelStep)
    assert both.branches is not None
    retry = both.branches["right"][0].retry
    assert retry is not None
    assert retry.initial_interval == pytest.approx(0.2)
    refine = spec.steps[5]
    assert isinstance(refine, LoopStep)
    assert refine.max_iterations == 4


@pytest.mark.parametrize(
    "path",
    ["examples/hello.yaml", "src/controltower/templates/support_triage/workflow.yaml"],
)
def test_shipped_specs_load(path: str) -> None:
    assert load_spec_file(REPO / path).steps


def test_minimal_spec_without_owner_or_kpis_is_fine() -> None:
    spec = load_spec_text(
        "name: tiny\ntools: {t: {impl: 'builtin:echo'}}\nsteps: [{id: a, kind: tool, tool: t}]"
    )
    assert spec.owner is None
    assert spec.kpis == []
    assert [trigger.kind for trigger in spec.triggers] == ["manual"]


def test_plain_python_values_come_out_of_yaml() -> None:
    text = """
    name: plain
    tools: {t: {impl: "builtin:echo"}}
    steps:
      - id: a
        kind: tool
        tool: t
        input:
          when: 2024-05-01
          note: |
            two
            lines
    """
    step = load_spec_text(textwrap.dedent(text)).steps[0]
    assert step.input == {"when": "2024-05-01", "note": "two\nlines\n"}
    assert isinstance(step.input, dict)
    assert type(step.input["note"]) is str


def test_yaml_merge_keys_are_expanded() -> None:
    text = """
    name: merged
    labels: &common {team: a}
    tools: {t: {impl: "builtin:echo"}}
    steps:
      - id: a
        kind: tool
        tool: t
        input: {<<: *common, extra: 1}
    """
    step = load_spec_text(textwrap.dedent(text)).steps[0]
    assert step.input == {"team": "a", "extra": 1}


def test_json_schema_of_specs_prints() -> None:
    schema = WorkflowSpec.model_json_schema()
    text = json.dumps(schema)
    assert "steps" in schema["properties"]
    for kind in STEP_KINDS:
        assert f'"{kind}"' in text


def test_load_spec_data_validates_like_text() -> None:
    data = {"name": "d", "tools": {"t": {}}, "steps": [{"id": "a", "kind": "tool", "tool": "t"}]}
    assert load_spec_data(data).steps[0].id == "a"
    with pytest.raises(SpecError) as info:
        load_spec_data({**data, "steps": [{"id": "a", "kind": "tool", "tool": "nope"}]})
    issue = only(info.value.issues, "steps[0].tool")
    assert issue.line is None
    with pytest.raises(SpecError, match="top level must be a mapping"):
        load_spec_data([1, 2])  # type: ignore[arg-type]


# -- reading and parsing ----------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec_file(path)
    [issue] = info.value.issues
    assert issue.message == "file not found"
    assert issue.file == str(path)


def test_directory_is_not_a_spec(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="is a directory"):
        load_spec_file(tmp_path)


def test_file_over_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (loader.MAX_SPEC_BYTES + 1))
    with pytest.raises(SpecError, match="larger than 5 MB"):
        load_spec_file(path)
    with pytest.raises(SpecError, match="larger than 5 MB"):
        load_spec_text("#" * (loader.MAX_SPEC_BYTES + 1))


def test_not_utf8_has_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: x\ntitle: caf\xe9\n")
    with pytest.raises(SpecError) as info:
        load_spec_file(path)
    [issue] = info.value.issues
    assert "UTF-8" in issue.message
    assert issue.line == 2


@pytest.mark.parametrize("text", ["", "   \n", "# just a comment\n"])
def test_empty_spec(text: str) -> None:
    [issue] = issues_of(text)
    assert issue.message == "the spec is empty"


@pytest.mark.parametrize(
    ("text", "found"), [("- a\n- b\n", "a list"), ("hello\n", "a string"), ("3\n", "int")]
)
def test_top_level_must_be_mapping(text: str, found: str) -> None:
    [issue] = issues_of(text)
    assert issue.message == f"the top level must be a mapping, found {found}"
    assert issue.line == 1


def test_yaml_syntax_error_has_line() -> None:
    text = """
    name: x
    steps:
      - id: a
       kind: tool  # bad indent
    """
    [issue] = issues_of(text)
    assert issue.message.startswith("YAML syntax error")
    assert issue.line == line_of(text, "# bad indent")
    assert issue.file == "spec.yaml"
    assert issue.render().startswith(f"spec.yaml:{issue.line}: ")


def test_duplicate_yaml_key_has_line_of_second_key() -> None:
    text = """
    name: x
    steps:
      - id: a
        kind: tool
        id: b  # again
    """
    [issue] = issues_of(text)
    assert "duplicate key" in issue.message
    assert issue.line == line_of(text, "# again")


def test_alias_bomb_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "MAX_VALUES", 1000)
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 10)}]" for n in range(1, 5)]
    [issue] = issues_of("\n".join(["name: bomb", *levels, "steps: []"]))
    assert "more than 1,000 values" in issue.message


@pytest.mark.parametrize(
    ("depth", "message"),
    [(150, "spec is nested more than 100 levels deep"), (600, "YAML is nested too deeply")],
)
def test_deep_nesting_is_refused(depth: int, message: str) -> None:
    [issue] = issues_of("name: x\nlabels: " + "[" * depth + "]" * depth + "\nsteps: []\n")
    assert issue.message == message


def test_custom_tag_is_refused_with_line() -> None:
    text = """
    name: x
    title: !Sub "${AWS::Region}"  # tagged
    steps: []
    """
    [issue] = issues_of(text)
    assert issue.message == "unsupported YAML tag !Sub"
    assert (issue.path, issue.line) == ("title", line_of(text, "# tagged"))


# -- model errors, located ------------------------------------------------------------------

BROKEN = """
name: Not_Valid            # name
triggers:
  - kind: cron
    schedule: "* *"        # schedule
agents:
  "bad agent": {kind: rule, rules: [{output: {}}]}   # agent key
  py: {kind: python}       # python agent
tools:
  t: {impl: "builtin:echo"}
steps:
  - id: a
    kind: tool
    tool: t
    inptu: {x: 1}          # typo
  - id: b
    kind: tol              # kind typo
  - id: c                  # no kind
    tool: t
  - id: d
    kind: parallel
    branches:
      left:
        - id: e            # no tool
          kind: tool
  - id: f
    kind: route
    routes:
      - when: "True"
        goto: 3            # goto int
  - id: g
    kind: wait
    duration: 5 parsecs    # duration
  - id: h
    kind: tool
    tool: t
    input: 5               # union
  - just a string          # not a mapping
"""


def test_all_model_errors_are_reported_at_once_with_lines() -> None:
    issues = issues_of(BROKEN)
    expected = {
        "name": "# name",
        "triggers[0].schedule": "# schedule",
        'agents["bad agent"]': "# agent key",
        "agents.py": "# python agent",
        "steps[0].inptu": "# typo",
        "steps[1].kind": "# kind typo",
        "steps[2].kind": "# no kind",
        "steps[3].branches.left[0].tool": "# no tool",
        "steps[4].routes[0].goto": "# goto int",
        "steps[5].duration": "# duration",
        "steps[6].input": "# union",
        "steps[7]": "# not a mapping",
    }
    assert {issue.path: issue.line for issue in issues} == {
        path: line_of(BROKEN, marker) for path, marker in expected.items()
    }
    assert len(issues) == len(expected)
    assert all(issue.file == "spec.yaml" for issue in issues)
    lines = [issue.line or 0 for issue in issues]
    assert lines == sorted(lines)


def test_unknown_field_hint_suggests_and_lists_fields() -> None:
    issue = only(issues_of(BROKEN), "steps[0].inptu")
    assert issue.message == "unknown field 'inptu'"
    assert issue.hint is not None
    assert issue.hint.startswith("did you mean 'input'?")
    assert "allowed fields: id, title, input" in issue.hint
    assert "tool" in issue.hint.split("allowed fields: ")[1].split(", ")


def test_unknown_top_level_field_lists_workflow_fields() -> None:
    [issue] = issues_of("name: x\ndescriptoin: y\nsteps: [{id: a, kind: wait, event: e}]\n")
    assert (issue.path, issue.line) == ("descriptoin", 2)
    assert issue.hint is not None
    assert issue.hint.startswith("did you mean 'description'? allowed fields: name, title, description")


def test_wrong_kind_lists_step_kinds() -> None:
    issues = issues_of(BROKEN)
    wrong = only(issues, "steps[1].kind")
    assert wrong.message == "unknown kind 'tol'"
    assert wrong.hint == "did you mean 'tool'? valid kinds: " + ", ".join(STEP_KINDS)
    missing = only(issues, "steps[2].kind")
    assert missing.message == "missing `kind`"
    assert missing.hint is not None
    assert ", ".join(STEP_KINDS) in missing.hint


def test_missing_field_is_named() -> None:
    issue = only(issues_of(BROKEN), "steps[3].branches.left[0].tool")
    assert issue.message == "missing required field 'tool'"
    assert issue.hint is not None
    assert "`tool:" in issue.hint


def test_union_alternatives_are_one_issue() -> None:
    issue = only(issues_of(BROKEN), "steps[6].input")
    assert issue.message == "Input should be a valid dictionary or a valid string (got int)"


def test_model_validator_and_pattern_messages_are_readable() -> None:
    issues = issues_of(BROKEN)
    assert only(issues, "agents.py").message == "a python agent needs impl: 'module:function'"
    key = only(issues, 'agents["bad agent"]')
    assert key.message == "'bad agent' is not a valid name"
    assert key.hint is not None
    assert "letters, digits" in key.hint
    duration = only(issues, "steps[5].duration")
    assert duration.message.startswith("'5 parsecs' is not a duration")


def test_tool_field_of_tool_step_keeps_its_name() -> None:
    # pydantic's loc is ('steps', 0, 'tool', 'tool'): the first 'tool' is the union tag.
    [issue] = issues_of("name: x\nsteps:\n  - id: a\n    kind: tool\n    tool: ''\n")
    assert issue.path == "steps[0].tool"
    assert issue.line == 5


def test_semantic_issues_are_located_too() -> None:
    text = """
    name: x
    tools: {t: {impl: "builtin:echo"}}
    steps:
      - id: a
        kind: tool
        tool: t
        input:
          nested:
            - "${{ nope.x }}"  # expr
    """
    [issue] = issues_of(text)
    assert issue.path == "steps[0].input.nested[0]"
    assert issue.line == line_of(text, "# expr")
    assert issue.file == "spec.yaml"


def test_missing_top_level_field_points_at_the_document() -> None:
    [issue] = issues_of("# a comment first\n\nname: x\n")
    assert (issue.path, issue.message, issue.line) == ("steps", "missing required field 'steps'", 3)
