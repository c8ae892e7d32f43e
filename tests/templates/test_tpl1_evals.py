"""The eval runner: the suite format, matching, approvals, pass criteria, the regression gate, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from controltower.cli.main import cli
from controltower.evals import SuiteResult, load_suite, run_suite
from controltower.evals.matching import match
from controltower.evals.result import CaseResult, gate
from controltower.spec.errors import SpecError

SUPPORT = Path(__file__).resolve().parents[2] / "src/controltower/templates/support_triage"


def write_suite(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "eval.yaml"
    path.write_text(f"workflow: {SUPPORT / 'workflow.yaml'}\n" + body, encoding="utf-8")
    return path


def test_subset_match_dotted_paths_and_operators() -> None:
    actual = {"a": {"b": [1, {"sku": "X"}]}, "text": "Hello Ana", "n": 3, "flag": True}
    assert match(actual, {"a.b.1.sku": "X", "a": {"b": [1, {"sku": "X"}]}, "n": 3.0}) == []
    assert match(actual, {"text": {"$contains": "Ana", "$regex": "^Hel"}, "n": {"$gte": 3, "$lt": 4}}) == []
    assert match(actual, {"missing": {"$exists": False}, "a.b": {"$len": 2}, "n": {"$in": [1, 3]}}) == []
    problems = match(actual, {"a.b.0": 2, "flag": 1, "text": {"$contains": "Bob"}, "nope.x": "y"})
    assert [p.path for p in problems] == ["a.b.0", "flag", "text", "nope.x"]
    assert match(actual, {"n": {"$bogus": 1}})[0].message.startswith("unknown operator")


def test_a_bad_suite_reports_every_problem(tmp_path: Path) -> None:
    path = write_suite(
        tmp_path,
        "concurrency: 0\ncases:\n"
        "  - {id: a, input: {}, expect: {status: finished}}\n  - {id: a, input: {}}\n",
    )
    with pytest.raises(SpecError) as caught:
        load_suite(path)
    paths = {issue.path for issue in caught.value.issues}
    assert "concurrency" in paths
    assert any(p.startswith("cases.0.expect.status") for p in paths)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="no eval suite here"):
        load_suite(tmp_path / "empty")


async def test_cases_approvals_and_pass_rate(tmp_path: Path) -> None:
    path = write_suite(
        tmp_path,
        """
pass: {min_pass_rate: 0.75}
cases:
  - id: automated
    input: {id: T-1, subject: "Can't log in", body: "I forgot my password.", email: ana@example.com}
    expect: {status: completed, output: {action: auto_sent}, tools_called: [send_reply], approvals: 0}
  - id: reviewed
    input: {id: T-2, subject: Hello, body: Something else, email: bo@example.com}
    approvals: {human_review: reject}
    expect: {output: {action: escalated}, escalated: true, approvals: {min: 1, max: 1}}
  - id: left
    input: {id: T-3, subject: Hello, body: Something odd, email: cy@example.com}
    approvals: leave
    expect: {status: waiting, tools_not_called: [send_reply]}
  - id: wrong-on-purpose
    input: {id: T-4, subject: Hacked, body: My account was hacked, email: di@example.com}
    expect: {output: {action: auto_sent}}
""",
    )
    result = await run_suite(path)
    by_id = {c.id: c for c in result.cases}
    assert [c.id for c in result.cases] == ["automated", "reviewed", "left", "wrong-on-purpose"]
    assert by_id["automated"].passed
    assert by_id["reviewed"].passed
    assert by_id["left"].passed
    wrong = by_id["wrong-on-purpose"]
    assert not wrong.passed
    assert [(f.check, f.expected, f.actual) for f in wrong.failures] == [
        ("output.action", "auto_sent", "escalated")
    ]
    assert result.pass_rate == 0.75
    assert result.passed


def test_gate_fails_on_a_case_that_passed_in_the_baseline() -> None:
    def result(*cases: tuple[str, bool]) -> SuiteResult:
        rows = [CaseResult(id=i, passed=ok, status="completed") for i, ok in cases]
        rate = sum(ok for _, ok in cases) / len(cases)
        return SuiteResult(
            suite="s",
            workflow="w",
            passed=True,
            pass_rate=rate,
            min_pass_rate=0.0,
            cases_total=len(rows),
            cases_passed=sum(ok for _, ok in cases),
            duration_s=0.0,
            cases=rows,
        )

    gated = gate(
        result(("a", False), ("b", True), ("new", True)), result(("a", True), ("b", False), ("gone", True))
    )
    assert gated.regression is not None
    assert gated.regression.newly_failing == ["a"]
    assert gated.regression.newly_passing == ["b"]
    assert gated.regression.new_cases == ["new"]
    assert gated.regression.removed_cases == ["gone"]
    assert not gated.passed
    assert gate(result(("a", True)), result(("a", True))).passed


def test_tower_eval_exit_codes_and_baseline(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = write_suite(
        tmp_path,
        "cases:\n  - id: pw\n"
        "    input: {id: T-1, subject: Password, body: I forgot my password, email: a@b.io}\n"
        "    expect: {output: {action: auto_sent}}\n",
    )
    baseline = tmp_path / "baseline.json"
    first = runner.invoke(cli, ["eval", str(ok), "--save", str(baseline)])
    assert first.exit_code == 0, first.output
    assert "PASSED 1/1" in first.output
    # the same case now expected to escalate: it fails, and it is a regression against the baseline
    ok.write_text(ok.read_text().replace("auto_sent", "escalated"))
    second = runner.invoke(cli, ["eval", str(ok), "--baseline", str(baseline), "--json"])
    assert second.exit_code == 1
    data = SuiteResult.model_validate_json(second.output)
    assert data.regression is not None
    assert data.regression.newly_failing == ["pw"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "eval.yaml").write_text("cases: []\n")
    third = runner.invoke(cli, ["eval", str(bad)])
    assert third.exit_code == 2
