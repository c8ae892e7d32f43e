"""Policy suites: YAML cases run against the policies, and typed errors for broken suites."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from controltower.gateway.policy import PolicyError
from controltower.gateway.policy_suite import PolicySuiteError, run_suite

HERE = Path(__file__).parent / "policies"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A copy of the example policies and tools, next to which tests write suite files."""
    shutil.copytree(HERE / "support", tmp_path / "support")
    shutil.copy(HERE / "tools.yaml", tmp_path / "tools.yaml")
    return tmp_path


def write(workdir: Path, text: str, name: str = "suite.yaml") -> Path:
    path = workdir / name
    path.write_text(text, encoding="utf-8")
    return path


def suite_error(path: Path) -> PolicySuiteError:
    with pytest.raises(PolicySuiteError) as caught:
        run_suite(path)
    assert caught.value.code == "policy_suite_invalid"
    return caught.value


HEAD = "policies: ./support\ntools: ./tools.yaml\ncases:\n"
READ = "{agent: triage, workflow: support, tenant: acme, tool: kb.search, args: {query: q}}"
ONE_CASE = f"cases:\n  - name: r\n    request: {READ}\n    expect: allow\n"


def test_the_example_suite_passes() -> None:
    result = run_suite(HERE / "support_suite.yaml")
    assert result.ok, result.render()
    assert (result.passed, result.failed) == (12, 0)
    assert result.render().splitlines()[-1] == "12 passed, 0 failed"


def test_failing_cases_are_reported_with_what_differed() -> None:
    result = run_suite(HERE / "mixed_suite.yaml")
    assert not result.ok
    assert (result.passed, result.failed) == (1, 2)
    shell, group = result.cases[1], result.cases[2]
    assert shell.failures == (
        'expected allow, got deny: no policy grants Agent::"ops-bot" the irreversible tool shell.exec',
    )
    assert shell.line == 9
    assert group.failures == ("expected approval group 'managers', got 'finance'",)
    assert group.decision.policy_ids == ("refunds-large",)
    text = result.render()
    assert "FAIL wrong expectation for shell in prod" in text
    assert f"{HERE / 'mixed_suite.yaml'}:9: expected allow, got deny" in text
    assert 'principal == Agent::"ops-bot",' in text  # the explanation's suggested grant
    assert "PASS reads pass" in text


def test_policy_id_and_reason_checks(workdir: Path) -> None:
    path = write(
        workdir,
        HEAD + f"  - name: ids\n    request: {READ}\n    expect: allow\n    policy_ids: [acme-reads, ghost]\n"
        f"  - name: reason\n    request: {READ}\n    expect: allow\n    reason_contains: forbidden\n"
        f"  - name: null group\n    request: {READ}\n    expect: allow\n    approval_group: null\n",
    )
    result = run_suite(path)
    assert [case.passed for case in result.cases] == [False, False, True]
    assert result.cases[0].failures == (
        "expected policies acme-reads, ghost (ghost: no such policy id), got acme-reads",
    )
    assert result.cases[1].failures[0].startswith("expected the reason to contain 'forbidden', got ")


def test_inline_tools_and_a_single_policy_file(workdir: Path) -> None:
    path = write(
        workdir,
        "policies: ./support/writes.cedar\n"
        "tools:\n  - {name: helpdesk.reply, side_effect: write}\n"
        "  - {name: crm.update_contact, side_effect: write}\n"
        "cases:\n  - name: reply\n"
        "    request: {workflow: support, tool: helpdesk.reply}\n    expect: allow\n",
    )
    assert run_suite(path).ok


def test_a_tools_file_with_a_tools_key(workdir: Path) -> None:
    write(workdir, "tools:\n  - {name: kb.search}\n", "more_tools.yaml")
    path = write(
        workdir,
        "policies: ./support/reads.cedar\ntools: more_tools.yaml\ncases:\n"
        f"  - name: read\n    request: {READ}\n    expect: allow\n",
    )
    assert run_suite(path).ok


# -- broken suites -------------------------------------------------------------------------


def test_yaml_syntax_error_has_file_and_line(workdir: Path) -> None:
    path = write(workdir, HEAD + "  - name: x\n    request: {agent: a\n    expect: allow\n")
    (problem,) = suite_error(path).problems
    assert problem.startswith(f"{path}:")
    assert "YAML syntax error" in problem


def test_case_problems_name_the_case_and_line(workdir: Path) -> None:
    path = write(
        workdir,
        HEAD + f"  - name: typo\n    request: {READ}\n    expct: allow\n"
        f"  - name: bad effect\n    request: {READ}\n    expect: permit\n"
        "  - name: nobody\n    request: {tenant: acme, tool: kb.search}\n    expect: deny\n"
        "  - request: {agent: a, tool: kb.search, env: production}\n    expect: deny\n",
    )
    problems = suite_error(path).problems
    assert f"{path}:6: case 'typo': expct: unknown field" in problems
    assert f"{path}:4: case 'typo': expect: Field required" in problems
    assert any(
        p.startswith(f"{path}:9: case 'bad effect': expect: Input should be 'allow'") for p in problems
    )
    assert f"{path}:11: case 'nobody': request: a request names an `agent`, a `workflow`, or both" in problems
    assert f"{path}:13: case #4: name: Field required" in problems
    assert any(p.startswith(f"{path}:13: case #4: request.env: Input should be 'dev'") for p in problems)


def test_unknown_tool_names_the_case(workdir: Path) -> None:
    path = write(
        workdir,
        HEAD + "  - name: typo in tool\n    request: {agent: a, tool: kb.serch}\n    expect: deny\n",
    )
    (problem,) = suite_error(path).problems
    assert problem.startswith(f"{path}:5: case 'typo in tool': unknown tool 'kb.serch' (the suite's tools: ")


def test_missing_or_malformed_files(workdir: Path) -> None:
    assert suite_error(workdir / "nope.yaml").problems == (f"{workdir / 'nope.yaml'}: file not found",)
    assert "a suite is a mapping" in suite_error(write(workdir, "- just a list\n")).problems[0]
    missing = suite_error(write(workdir, "cases: []\n")).problems
    assert (
        f"{workdir / 'suite.yaml'}:1: cases: List should have at least 1 item after validation, not 0"
        in missing
    )
    assert f"{workdir / 'suite.yaml'}: policies: Field required" in missing
    union = suite_error(write(workdir, "policies: .\ntools: 5\n" + ONE_CASE)).problems
    assert union == (f"{workdir / 'suite.yaml'}:2: tools: Input should be a valid string or a valid list",)
    no_dir = write(
        workdir,
        "policies: ./nowhere\ntools: ./tools.yaml\n" + ONE_CASE,
    )
    assert "is neither a directory nor a .cedar file" in suite_error(no_dir).problems[0]


def test_bad_tool_definitions_name_the_tool_and_line(workdir: Path) -> None:
    write(
        workdir, "- {name: ok.tool}\n- name: bad.tool\n  side_effect: delete\n- {nme: x}\n", "bad_tools.yaml"
    )
    path = write(
        workdir,
        "policies: ./support\ntools: bad_tools.yaml\n" + ONE_CASE,
    )
    problems = suite_error(path).problems
    tools = workdir / "bad_tools.yaml"
    assert any(
        p.startswith(f"{tools}:3: tool 'bad.tool': side_effect: Input should be 'read'") for p in problems
    )
    assert f"{tools}:4: tool #3: nme: unknown field" in problems
    assert f"{tools}:4: tool #3: name: Field required" in problems


def test_broken_policies_raise_the_policy_error(workdir: Path) -> None:
    (workdir / "support" / "broken.cedar").write_text(
        "permit(principal, action, resource) when { principal.x };"
    )
    path = write(workdir, HEAD + f"  - name: r\n    request: {READ}\n    expect: allow\n")
    with pytest.raises(PolicyError, match=r"broken\.cedar:1: policy broken\.cedar#1: attribute `x`"):
        run_suite(path)
