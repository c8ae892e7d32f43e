"""The contract, claims, content and IT-desk templates: their eval suites pass on the offline
agents through the governed gateway, their policy suites pass, and each one's key governance
rule holds against the real engine, gateway and sandbox (SQLite) systems."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from controltower.cli.main import cli
from controltower.engine import EmbeddedEngine
from controltower.evals import SuiteResult, run_suite
from controltower.gateway.approvals import Approver, NotAllowedToApprove
from controltower.gateway.engine_gate import GovernedToolGate
from controltower.gateway.pipeline import ToolGateway, open_gateway
from controltower.gateway.policy_suite import run_suite as run_policy_suite
from controltower.spec.loader import load_spec_file
from controltower.spec.models import WorkflowSpec

TEMPLATES = Path(__file__).resolve().parents[2] / "src/controltower/templates"
NAMES = ["contract_review", "insurance_claims", "content_compliance", "it_service_desk"]


def _summary(result: SuiteResult) -> str:
    return "\n".join(f"{c.id}: {[f.model_dump() for f in c.failures]}" for c in result.failed_cases)


@pytest.mark.parametrize("name", NAMES)
async def test_eval_suite_passes_on_offline_agents(name: str) -> None:
    result = await run_suite(TEMPLATES / name)
    assert result.passed, _summary(result)
    assert result.cases_total >= 50
    assert any(c.escalated for c in result.cases)
    assert any(c.approvals for c in result.cases)
    # completed runs, approvals left undecided (waiting), and rejected irreversible calls (failed)
    expected = {"completed", "waiting"} | (set() if name == "contract_review" else {"failed"})
    assert {c.status for c in result.cases} >= expected
    modes = {c.output.get("mode") for c in result.cases if c.status == "completed"}
    assert "offline-heuristic" in modes
    assert modes <= {"offline-heuristic", None}


@pytest.mark.parametrize("name", NAMES)
def test_policy_suite_passes(name: str) -> None:
    result = run_policy_suite(TEMPLATES / name / "policy_suite.yaml")
    assert result.ok, result.render()


@asynccontextmanager
async def governed(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[EmbeddedEngine, ToolGateway, WorkflowSpec]]:
    """The engine on a SQLite file with the gateway governed by the template's policies."""
    monkeypatch.setenv("TOWER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TOWER_MODEL", raising=False)
    engine = await EmbeddedEngine.open(f"sqlite:///{tmp_path / 'tower.db'}", poll_interval=0.05)
    gateway = await open_gateway(engine.store, policies=str(folder / "policies"), monitor=False)
    engine.tool_gate = GovernedToolGate(gateway)
    try:
        yield engine, gateway, load_spec_file(folder / "workflow.yaml")
    finally:
        await engine.close()


def _rows(tmp_path: Path, system: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(tmp_path / "home" / "sandbox" / f"{system}.sqlite") as conn:
        return list(conn.execute(sql, args))


def _text(output: str) -> str:
    return " ".join(output.split())


def _case(name: str, description: str) -> dict[str, Any]:
    cases: list[dict[str, Any]] = json.loads((TEMPLATES / name / "data" / "eval_cases.json").read_text())
    return next(c for c in cases if c.get("description") == description)


async def test_claims_payout_above_threshold_waits_for_an_adjuster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = TEMPLATES / "insurance_claims"
    async with governed(folder, tmp_path, monkeypatch) as (engine, gateway, spec):
        small = await engine.start(spec, {"claim_id": "CLM-7001"}, base_dir=str(folder))
        large = await engine.start(spec, {"claim_id": "CLM-7017"}, base_dir=str(folder))
        done = await engine.wait(small, timeout=10)
        assert done.status == "completed"
        assert done.output["outcome"] == "paid"
        assert done.output["payable_cents"] <= 250_000
        assert await gateway.approvals.list(run_id=small, status=None) == []
        parked = await engine.wait(large, statuses=("waiting",), timeout=10)
        assert parked.status == "waiting"
        [request] = await gateway.approvals.list(run_id=large)
        assert (request.tool, request.approval_group) == ("insurance-claims.pay_claim", "claims-adjusters")
        assert request.args["amount_cents"] > 250_000
        paid = "SELECT claim_id, amount_cents FROM payouts WHERE claim_id = ?"
        assert _rows(tmp_path, "claims", paid, "CLM-7017") == []  # irreversible: no money before approval
        with pytest.raises(NotAllowedToApprove, match="claims-adjusters"):
            await gateway.decide(request.id, approver=Approver("sales-rep", groups=("sales",)), approve=True)
        adjuster = Approver("Ada Adjuster", groups=("claims-adjusters",))
        await gateway.decide(request.id, approver=adjuster, approve=True, reason="photos check out")
        await engine.wake(large)
        finished = await engine.wait(large, timeout=10)
        assert finished.status == "completed"
        assert finished.output["outcome"] == "paid"
        assert _rows(tmp_path, "claims", paid, "CLM-7017") == [("CLM-7017", request.args["amount_cents"])]
        assert _rows(tmp_path, "claims", paid, "CLM-7001") == [("CLM-7001", done.output["payable_cents"])]


async def test_content_is_published_only_after_both_checks_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = TEMPLATES / "content_compliance"
    three = _case(
        "content_compliance", "Adding the disclaimer makes a post too long: trimmed on the third draft."
    )
    never = _case(
        "content_compliance",
        "Every key point is a prohibited claim: nothing publishable remains, an editor takes over.",
    )
    async with governed(folder, tmp_path, monkeypatch) as (engine, _gateway, spec):
        run_id = await engine.start(spec, three["input"], base_dir=str(folder))
        run = await engine.wait(run_id, timeout=10)
        assert run.status == "completed", run.error
        assert run.output["outcome"] == "published"
        notes = _rows(
            tmp_path,
            "cms",
            "SELECT version, problems FROM review_notes WHERE run_id = ? ORDER BY version",
            run_id,
        )
        rules = [sorted({p["rule"] for p in json.loads(problems)}) for _, problems in notes]
        # draft 1 lacks the disclaimer, draft 2 is too long with it, draft 3 passes both checks
        assert rules == [["missing_disclaimer"], ["too_long"], []]
        [(body,)] = _rows(
            tmp_path, "cms", "SELECT body FROM published WHERE brief_id = ?", three["input"]["brief_id"]
        )
        assert body == run.output["body"]
        assert len(body) <= 280
        assert "Past performance" in body or "Food supplements" in body

        blocked = await engine.start(spec, never["input"], base_dir=str(folder))
        run = await engine.wait(blocked, timeout=10)
        assert run.status == "completed"
        assert run.output["outcome"] == "needs_editor"
        assert run.output["iterations"] == 3  # bounded: three drafts, then a human
        brief = never["input"]["brief_id"]
        assert _rows(tmp_path, "cms", "SELECT 1 FROM published WHERE brief_id = ?", brief) == []
        assert len(_rows(tmp_path, "cms", "SELECT 1 FROM editor_queue WHERE brief_id = ?", brief)) == 1


async def test_contract_with_flagged_issues_never_reaches_a_signatory_without_legal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = TEMPLATES / "contract_review"
    flagged = _case(
        "contract_review",
        "Personal data without a data processing agreement is high risk: legal must clear it.",
    )
    queued = "SELECT signatory, legal_cleared FROM signature_queue WHERE contract_id = ?"
    contract = flagged["input"]["contract_id"]
    async with governed(source, tmp_path, monkeypatch) as (engine, _gateway, spec):
        run_id = await engine.start(spec, flagged["input"], base_dir=str(source))
        run = await engine.wait(run_id, statuses=("waiting",), timeout=10)
        steps = await engine.store.load_steps(run_id)
        assert steps["legal_review"].status == "waiting"
        assert steps["legal_review"].input["risk"] == "high"
        assert {"commercial_review", "regulatory_review", "pricing_review"} <= {
            r.step_id for r in steps.values()
        }
        assert _rows(tmp_path, "clm", queued, contract) == []
        await engine.decide(run_id, "legal_review", approved=False, by="counsel", comment="attach the DPA")
        run = await engine.wait(run_id, timeout=10)
        assert run.output["decision"] == "returned"
        assert run.output["legal_review"] == "rejected"
        [(reasons,)] = _rows(tmp_path, "clm", "SELECT reasons FROM returned WHERE contract_id = ?", contract)
        assert json.loads(reasons)[:2] == ["legal: attach the DPA", "dpa_missing"]
        assert _rows(tmp_path, "clm", queued, contract) == []

    # an edited workflow that skips legal review is stopped by policy at the gateway
    folder = tmp_path / "edited"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("__pycache__"))
    text = (folder / "workflow.yaml").read_text()
    skip_legal = text.replace("when: steps.report.output.needs_legal", "when: 1 == 0", 1)  # a bad edit
    assert skip_legal != text
    (folder / "workflow.yaml").write_text(skip_legal)
    (tmp_path / "second").mkdir()
    async with governed(folder, tmp_path / "second", monkeypatch) as (engine, _gateway, spec):
        run_id = await engine.start(spec, flagged["input"], base_dir=str(folder))
        run = await engine.wait(run_id, timeout=10)
        assert run.status == "failed"
        assert "legal review" in str(run.error)
        assert _rows(tmp_path / "second", "clm", queued, contract) == []


def test_service_desk_writes_need_approval_until_autonomy_is_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The autonomy ladder: approve_writes, then `tower autonomy set ... autonomous_low_risk`
    (four eyes: asked by one person, approved by another). Ticket updates (low risk) then run
    on their own; resolutions (medium risk) still wait for a person."""
    folder = TEMPLATES / "it_service_desk"
    db = f"sqlite:///{tmp_path / 'tower.db'}"
    status = "SELECT status, priority FROM tickets WHERE ticket_id = ?"

    async def run_ticket(ticket: str) -> tuple[list[str], str]:
        async with governed(folder, tmp_path, monkeypatch) as (engine, gateway, spec):
            run_id = await engine.start(spec, {"ticket_id": ticket}, base_dir=str(folder))
            assert (await engine.wait(run_id, statuses=("waiting",), timeout=10)).status == "waiting"
            pending = await gateway.approvals.list(run_id=run_id)
            tools = [a.tool.split(".", 1)[1] for a in pending]
            return tools, str(pending[0].context.get("why"))

    # rung one: even the routine ticket update waits, and nothing is written
    tools, reason = asyncio.run(run_ticket("INC-4001"))
    assert tools == ["update_ticket"]
    assert "approve_writes" in reason
    assert _rows(tmp_path, "itsm", status, "INC-4001") == [("new", None)]

    runner = CliRunner()
    base = ["--db", db, "autonomy"]
    level = [
        *base,
        "set",
        "it-service-desk",
        "autonomous_low_risk",
        "--reason",
        "98% of updates approved as is",
    ]
    asked = runner.invoke(cli, [*level, "--as", "alice"])
    assert asked.exit_code == 0, asked.output
    assert "waits for another person" in _text(asked.output)
    same = runner.invoke(cli, [*base, "approve", "it-service-desk", "--as", "alice"])
    assert same.exit_code == 1, same.output
    assert "cannot approve" in _text(same.output)
    approved = runner.invoke(cli, [*base, "approve", "it-service-desk", "--as", "bob"])
    assert approved.exit_code == 0, approved.output
    assert "autonomy is now autonomous_low_risk" in _text(approved.output)

    # rung two: the update ran on its own; only the resolution (medium risk) waits
    tools, reason = asyncio.run(run_ticket("INC-4002"))
    assert tools == ["resolve_ticket"]
    assert "risk medium is above low" in reason
    assert _rows(tmp_path, "itsm", status, "INC-4002") == [("assigned", "P3")]
