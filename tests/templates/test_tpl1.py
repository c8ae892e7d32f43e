"""The support, lead and invoice templates: their eval suites pass on the offline agents, their
governance rules hold (one message per lead per window, payments always approved), `tower init`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from controltower.cli.main import cli
from controltower.evals import SuiteResult, run_suite
from controltower.gateway.policy_suite import run_suite as run_policy_suite

TEMPLATES = Path(__file__).resolve().parents[2] / "src/controltower/templates"


def _summary(result: SuiteResult) -> str:
    return "\n".join(f"{c.id}: {[f.model_dump() for f in c.failures]}" for c in result.failed_cases)


@pytest.mark.parametrize("name", ["support_triage", "lead_to_meeting", "invoice_matching"])
async def test_eval_suite_passes_on_offline_agents(name: str) -> None:
    result = await run_suite(TEMPLATES / name)
    assert result.passed, _summary(result)
    assert result.cases_total >= 50
    statuses = {c.status for c in result.cases}
    assert {"completed", "invalid_input"} <= statuses  # the seeded data has broken records too
    assert any(c.escalated for c in result.cases) or name == "lead_to_meeting"


@pytest.mark.parametrize("name", ["lead_to_meeting", "invoice_matching"])
def test_policy_suite_passes(name: str) -> None:
    result = run_policy_suite(TEMPLATES / name / "policy_suite.yaml")
    assert result.ok, result.render()


def _copy(tmp_path: Path, name: str) -> Path:
    dest = tmp_path / name
    shutil.copytree(TEMPLATES / name, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


async def test_never_two_messages_to_one_lead_in_the_window_even_when_racing(tmp_path: Path) -> None:
    """Two submissions of the same new lead run at once and both replies are approved:
    only one message goes out, whichever run gets there first."""
    folder = _copy(tmp_path, "lead_to_meeting")
    lead = "{email: new.lead@northwind.io, name: Nell, company: Northwind Analytics, message: Demo please}"
    either = (
        "{status: completed, output: {action: {$in: [meeting_proposed, send_blocked, already_contacted]}}}"
    )
    (folder / "race.yaml").write_text(
        "concurrency: 2\ncases:\n"
        f"  - {{id: first, input: {{lead_id: L-1, {lead[1:]}, expect: {either}}}\n"
        f"  - {{id: second, input: {{lead_id: L-2, {lead[1:]}, expect: {either}}}\n"
        "  - id: third\n"
        f"    input: {{lead_id: L-3, {lead[1:]}\n"
        "    expect: {output: {action: already_contacted}, approvals: 0, tools_not_called: [send_email]}\n"
    )
    result = await run_suite(folder / "race.yaml")
    assert result.passed, _summary(result)
    sent = [c for c in result.cases if "send_email" in c.tools_called]
    assert len(sent) == 1
    other = next(c for c in result.cases[:2] if c is not sent[0])
    assert other.output["action"] in ("send_blocked", "already_contacted")


def test_send_email_refuses_a_second_message_in_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOWER_HOME", str(tmp_path))
    monkeypatch.syspath_prepend(str(TEMPLATES / "lead_to_meeting"))
    import lead_to_meeting_agents as agents

    class Ctx:
        def __init__(self, key: str) -> None:
            self.idempotency_key = key

    message = {"lead_id": "L-1", "to": "Solo@Example.com", "subject": "Hi", "text": "Hello " * 10}
    assert agents.send_email(message, Ctx("run-1:send"))["duplicate"] is False
    assert agents.send_email(message, Ctx("run-1:send"))["duplicate"] is True  # a retry is not a new message
    with pytest.raises(agents.OutboundLimitError, match="one outbound message per lead"):
        agents.send_email({**message, "to": "solo@example.com"}, Ctx("run-2:send"))
    assert agents.outreach_history({"email": "SOLO@example.com"})["messages_in_window"] == 1


async def test_payments_need_treasury_approval_even_at_expanded_autonomy(tmp_path: Path) -> None:
    """Autonomy `expanded` lets whatever policy allows run; the Cedar @approval still makes
    treasury approve every payment, and with nobody deciding no money moves."""
    folder = _copy(tmp_path, "invoice_matching")
    spec = (folder / "workflow.yaml").read_text()
    spec = spec.replace("autonomy: autonomous_low_risk", "autonomy: expanded", 1)
    spec = spec.replace(
        "    tools: [schedule_payment]", "    tools: [schedule_payment]\n    autonomy: expanded"
    )
    (folder / "workflow.yaml").write_text(spec)
    invoice = (
        "{invoice_id: I-1, vendor_id: V-100, vendor_name: Office Supplies GmbH, invoice_number: N-1,"
        " po_number: PO-5001, currency: EUR, total_cents: 179000,"
        " lines: [{sku: PAPER-A4, qty: 200, unit_price_cents: 450},"
        " {sku: TONER-K, qty: 10, unit_price_cents: 8900}]}"
    )
    (folder / "pay.yaml").write_text(
        "cases:\n"
        f"  - id: nobody-decides\n    input: {invoice}\n"
        "    approvals: {manager_approval: approve, 'tool:schedule_payment': leave}\n"
        "    expect: {status: waiting, approvals: 2, tools_not_called: [schedule_payment]}\n"
        f"  - id: treasury-approves\n    input: {invoice.replace('I-1', 'I-2').replace('N-1', 'N-2')}\n"
        "    expect: {status: completed, output: {action: payment_scheduled}, approvals: 2,"
        " tool_outcomes: {schedule_payment: ok}}\n"
    )
    result = await run_suite(folder / "pay.yaml")
    assert result.passed, _summary(result)


def test_tower_init_copies_a_template(tmp_path: Path) -> None:
    runner = CliRunner()
    listed = runner.invoke(cli, ["init", "--list"])
    assert listed.exit_code == 0
    for name in ("support_triage", "lead_to_meeting", "invoice_matching"):
        assert name in listed.output
    dest = tmp_path / "my-leads"
    made = runner.invoke(cli, ["init", "--template", "lead-to-meeting", str(dest)])
    assert made.exit_code == 0, made.output
    for part in ("workflow.yaml", "eval.yaml", "README.md", "lead_to_meeting_agents.py", "data/leads.json"):
        assert (dest / part).is_file(), part
    assert list(dest.glob("policies/*.cedar"))
    again = runner.invoke(cli, ["init", "--template", "lead_to_meeting", str(dest)])
    assert again.exit_code == 1
    assert "is not empty" in " ".join(again.output.split())
    unknown = runner.invoke(cli, ["init", "--template", "nope", str(tmp_path / "x")])
    assert unknown.exit_code == 1
    assert "no template named 'nope'" in " ".join(unknown.output.split())
