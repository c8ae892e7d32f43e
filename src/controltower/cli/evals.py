"""`tower eval` (run an eval suite) and `tower init` (start from a ready-made template)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from controltower.cli import render
from controltower.spec.errors import InvalidInputError, NotFoundError

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
EXIT_FAILED = 1


def register(cli: click.Group) -> None:
    from controltower.cli import main as m

    out, run_async = m.out, m.run_async

    @cli.command("eval")
    @click.argument("target", type=click.Path())
    @click.option("--json", "as_json", is_flag=True, help="Print the SuiteResult as JSON (a baseline file).")
    @click.option(
        "--baseline", type=click.Path(dir_okay=False), help="Fail on regressions against this result."
    )
    @click.option(
        "--save", type=click.Path(dir_okay=False), help="Also write the result (JSON) to this file."
    )
    @click.option(
        "--store",
        default=None,
        help="Store URL for the eval runs (default: a fresh SQLite file in a temporary directory).",
    )
    @run_async
    async def eval_(
        target: str, as_json: bool, baseline: str | None, save: str | None, store: str | None
    ) -> None:
        """Run the eval suite TARGET (an eval.yaml, or a directory holding one).

        Exit code 0 when the suite passes, 1 when it fails (or regresses against --baseline),
        2 when the suite file is invalid.
        """
        from controltower.evals import run_suite

        result = await run_suite(target, db=store, baseline=baseline)
        if save:
            Path(save).write_text(result.to_json() + "\n", encoding="utf-8")
        if as_json:
            click.echo(result.to_json())
        else:
            _print_result(out, result)
        if not result.passed:
            sys.exit(EXIT_FAILED)

    @cli.command("init")
    @click.option("--template", "-t", "name", help="Template to copy (see --list).")
    @click.option("--list", "list_", is_flag=True, help="List the templates.")
    @click.option("--force", is_flag=True, help="Copy into DIR even if it is not empty.")
    @click.argument("directory", required=False, type=click.Path(file_okay=False))
    def init(name: str | None, list_: bool, force: bool, directory: str | None) -> None:
        """Copy a ready-made workflow template into DIR (default: ./NAME)."""
        try:
            if list_ or not name:
                if not list_:
                    raise InvalidInputError(
                        "name a template", hint="tower init --template NAME [DIR]; see --list"
                    )
                _list_templates(out)
                return
            source = find_template(name)
            dest = Path(directory or source.name)
            copy_template(source, dest, force=force)
        except Exception as exc:
            m.fail(exc)
            return
        out.print(f"Copied template [cyan]{source.name}[/cyan] to [bold]{dest}[/bold].")
        out.print(f"  run the eval suite:  tower eval {dest}")
        out.print(f"  run one case:        tower run {dest / 'workflow.yaml'} --input '{{...}}'")
        out.print(f"  read first:          {dest / 'README.md'}")


def templates() -> dict[str, Path]:
    """The shipped templates by directory name (each has a workflow.yaml)."""
    if not TEMPLATES.is_dir():
        return {}
    return {p.name: p for p in sorted(TEMPLATES.iterdir()) if (p / "workflow.yaml").is_file()}


def find_template(name: str) -> Path:
    known = templates()
    key = name.strip().replace("-", "_")
    if key in known:
        return known[key]
    raise NotFoundError(
        f"no template named {name!r}",
        hint="templates: " + (", ".join(known) or "none installed") + " (tower init --list)",
    )


def copy_template(source: Path, dest: Path, *, force: bool = False) -> None:
    if dest.exists() and not dest.is_dir():
        raise InvalidInputError(f"{dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise InvalidInputError(f"{dest} is not empty", hint="pick another DIR, or pass --force")
    shutil.copytree(
        source,
        dest,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.sqlite", "*.sqlite-*"),
    )


def _list_templates(out: Any) -> None:
    from ruamel.yaml import YAML

    table = Table("template", "workflow", "what it does")
    for name, folder in templates().items():
        try:
            data = YAML(typ="safe", pure=True).load((folder / "workflow.yaml").read_text(encoding="utf-8"))
        except Exception:  # a broken template is still listed, so it can be inspected
            data = {}
        data = data if isinstance(data, dict) else {}
        table.add_row(
            name, str(data.get("name", "?")), str(data.get("description") or data.get("title") or "")
        )
    out.print(table)


def _print_result(out: Any, result: Any) -> None:
    table = Table("case", "status", "result", "approvals", "escalated", title=f"Eval: {result.suite}")
    for case in result.cases:
        verdict = "[green]pass[/green]" if case.passed else "[red]FAIL[/red]"
        table.add_row(
            render.escape(case.id),
            case.status,
            verdict,
            str(case.approvals),
            "yes" if case.escalated else "no",
        )
    out.print(table)
    for case in result.failed_cases:
        out.print(
            f"[red]FAIL[/red] {render.escape(case.id)}" + (f"  (run {case.run_id})" if case.run_id else "")
        )
        for failure in case.failures:
            note = f" ({render.escape(failure.message)})" if failure.message else ""
            out.print(
                f"    {render.escape(failure.check)}: expected {render.escape(repr(failure.expected))}, "
                f"got {render.escape(repr(failure.actual))}{note}"
            )
    verdict = "[green]PASSED[/green]" if result.passed else "[red]FAILED[/red]"
    out.print(
        f"{verdict} {result.cases_passed}/{result.cases_total} cases "
        f"(pass rate {result.pass_rate:.0%}, needed {result.min_pass_rate:.0%}) in {result.duration_s:.1f} s"
    )
    if result.required_failed:
        out.print("required cases failed: " + ", ".join(result.required_failed))
    reg = result.regression
    if reg is not None:
        state = "[green]no regression[/green]" if reg.ok else "[red]REGRESSION[/red]"
        out.print(f"{state} against the baseline (pass rate {reg.baseline_pass_rate:.0%})")
        if reg.newly_failing:
            out.print("  newly failing: " + ", ".join(reg.newly_failing))
        if reg.newly_passing:
            out.print("  newly passing: " + ", ".join(reg.newly_passing))
        if reg.new_cases or reg.removed_cases:
            out.print(f"  new cases: {len(reg.new_cases)}, removed cases: {len(reg.removed_cases)}")
