"""Control Tower vs LangGraph on the same durable workloads; prints one table.

    .venv/bin/python bench/run.py [--only W1,W3,GW] [--quick] [--workdir DIR] [--json FILE] [--in-process]

One command runs both systems, one workload at a time, each on its own fresh SQLite
file (WAL, ``synchronous=FULL``). By default every (workload, system) pair runs in a
fresh child Python process, so neither system inherits the other's heap: measured in one
process, the second system's peak-RSS delta shrinks by whatever the first one freed
(W4 showed 57 -> 38 MiB for LangGraph and 19 -> 5 MiB for Control Tower). ``--in-process``
runs everything in this process instead. Control Tower goes first in every workload.
The ratio column is LangGraph / Control Tower: above 1 means Control Tower is faster
(or smaller). Afterwards the tool-gateway overhead benchmark (bench/gateway.py, section
``GW``) runs in a child process; ``--no-gateway`` skips it. Workloads and results:
bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import FULL, QUICK, Result, Sizes

WORKLOADS = ("W1", "W2", "W3", "W4")
GATEWAY = "GW"  # the tool-gateway overhead section: bench/gateway.py, run after the workloads

DESCRIPTIONS = {
    "W1": "{w1_runs} runs x {w1_steps} sequential no-op steps",
    "W2": "{w2_runs} runs x fan-out to {w2_branches} branches + join",
    "W3": "{w3_runs} concurrent runs x {w3_steps} steps sleeping {w3_sleep}s",
    "W4": "{w4_runs} runs park on an approval, then all approved",
}

# (workload, metric) -> upper bound for Control Tower's figure; only checked at full size.
TARGETS = {
    ("W1", "ms/step"): 0.25,
    ("W3", "wall s"): 1.2,
    ("W4", "park s"): 1.0,
    ("W4", "resume s"): 1.0,
}

Workload = Callable[[Path, Sizes], Coroutine[Any, Any, Result]]


SIDES = {"tower": "bench.tower_side", "langgraph": "bench.langgraph_side"}


def load_side(key: str) -> ModuleType:
    return importlib.import_module(SIDES[key])


def load_sides() -> tuple[list[tuple[str, str, ModuleType]], list[str]]:
    """[(key, display name, module)] for the sides that can run, and why others cannot."""
    sides: list[tuple[str, str, ModuleType]] = []
    skipped: list[str] = []
    tower_side = load_side("tower")
    why = tower_side.available()
    if why is None:
        sides.append(("tower", tower_side.NAME, tower_side))
    else:
        skipped.append(
            f"Control Tower skipped: `from controltower.engine import EmbeddedEngine` failed ({why})"
        )
    try:
        langgraph_side = load_side("langgraph")
    except ImportError as exc:
        skipped.append(f"LangGraph skipped: {exc} (install with: pip install -e '.[bench]')")
    else:
        sides.append(("langgraph", langgraph_side.NAME, langgraph_side))
    return sides, skipped


def run_one(fn: Workload, workdir: Path, sizes: Sizes) -> dict[str, Any]:
    """One workload on one side, on a fresh event loop and a fresh directory."""
    gc.collect()
    where = Path(tempfile.mkdtemp(dir=workdir))
    started = time.perf_counter()
    try:
        result = asyncio.run(fn(where, sizes))
    except Exception as exc:
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}", "elapsed s": time.perf_counter() - started}
    finally:
        shutil.rmtree(where, ignore_errors=True)
    out = asdict(result)
    out["elapsed s"] = time.perf_counter() - started
    return out


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every metric over repeated runs; any failed run makes the result an error."""
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        return {"error": errors[0], "samples": runs}
    notes = list(dict.fromkeys(note for r in runs for note in r.get("notes", [])))
    merged: dict[str, Any] = {"metrics": {}, "extra": {}, "notes": notes}
    for part in ("metrics", "extra"):
        for name in runs[0].get(part, {}):
            merged[part][name] = statistics.median(r[part][name] for r in runs)
    merged["samples"] = [r["metrics"] for r in runs]
    return merged


def run_child(key: str, workload: str, workdir: Path, quick: bool) -> dict[str, Any]:
    """run_one in a fresh Python process; its result comes back through a JSON file."""
    fd, out = tempfile.mkstemp(suffix=".json", dir=workdir)
    os.close(fd)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        key,
        workload,
        out,
        "--workdir",
        str(workdir),
    ]
    if quick:
        cmd.append("--quick")
    try:
        proc = subprocess.run(cmd, check=False)
        text = Path(out).read_text()
        if proc.returncode != 0 or not text:
            return {"error": f"child process exited with {proc.returncode}"}
        data: dict[str, Any] = json.loads(text)
        return data
    finally:
        Path(out).unlink(missing_ok=True)


def run_gateway(args: argparse.Namespace) -> dict[str, Any]:
    """bench/gateway.py in a child process; it prints its own tables, its JSON comes back here."""
    print("\ntool-gateway overhead (bench/gateway.py) ...", file=sys.stderr, flush=True)
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "gateway.py"), "--json", out]
    if args.quick:
        cmd.append("--quick")
    if args.workdir is not None:
        cmd += ["--workdir", str(args.workdir)]
    try:
        proc = subprocess.run(cmd, check=False)
        text = Path(out).read_text()
        if not text:
            return {"error": f"bench/gateway.py exited with {proc.returncode}"}
        data: dict[str, Any] = json.loads(text)
        if proc.returncode != 0:
            data["error"] = f"bench/gateway.py exited with {proc.returncode}"
        return data
    finally:
        Path(out).unlink(missing_ok=True)


def child_main(args: argparse.Namespace) -> int:
    key, workload, out = args.child
    module = load_side(key)
    data = run_one(module.WORKLOADS[workload], args.workdir, QUICK if args.quick else FULL)
    Path(out).write_text(json.dumps(data))
    return 0


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "load average at start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory GiB"] = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    return info


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if float(value).is_integer() and abs(value) >= 10:
        return str(int(value))
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def build_rows(report: dict[str, Any], sizes: Sizes, full: bool) -> list[list[str]]:
    rows: list[list[str]] = []
    for workload, sides in report["results"].items():
        tower = sides.get("tower", {})
        graph = sides.get("langgraph", {})
        metrics = list(dict.fromkeys([*tower.get("metrics", {}), *graph.get("metrics", {})]))
        label = workload
        if not metrics:
            rows.append([label, "-", tower.get("error", "-"), graph.get("error", "-"), "-", ""])
            continue
        for i, metric in enumerate(metrics):
            ours = tower.get("metrics", {}).get(metric)
            theirs = graph.get("metrics", {}).get(metric)
            ratio = f"{theirs / ours:.1f}x" if ours and theirs is not None else "-"
            target = TARGETS.get((workload, metric))
            if target is None:
                goal = ""
            elif ours is None or not full:
                goal = f"<= {target:g}"
            else:
                goal = f"<= {target:g} " + ("ok" if ours <= target else "MISSED")
            rows.append(
                [
                    label if i == 0 else "",
                    metric,
                    fmt(ours) if ours is not None else tower.get("error", "skipped")[:40],
                    fmt(theirs) if theirs is not None else graph.get("error", "skipped")[:40],
                    ratio,
                    goal,
                ]
            )
    return rows


HEADERS = ["Workload", "Metric", "Control Tower", "LangGraph", "LG / CT", "Target (CT)"]


def print_table(rows: list[list[str]], notes: list[str]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [HEADERS, *rows]) for i in range(len(HEADERS))]
        for row in [HEADERS, ["-" * w for w in widths], *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        for note in notes:
            print(f"  - {note}")
        return
    table = Table(title="Control Tower vs LangGraph (durable SQLite, synchronous=FULL)")
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*row)
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    for note in notes:
        console.print(f"  - {note}", highlight=False, markup=False)


def collect_notes(report: dict[str, Any], sizes: Sizes) -> list[str]:
    notes = list(report["skipped"])
    for workload, sides in report["results"].items():
        notes.append(f"{workload}: {DESCRIPTIONS[workload].format(**asdict(sizes))}")
        for key, data in sides.items():
            name = "Control Tower" if key == "tower" else "LangGraph"
            for note in data.get("notes", []):
                notes.append(f"{workload} {name}: {note}")
            for metric, value in data.get("extra", {}).items():
                notes.append(f"{workload} {name}: {metric} = {fmt(value)}")
            if "error" in data:
                notes.append(f"{workload} {name}: ERROR {data['error']}")
    return notes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", default="", help="comma-separated workloads to run, e.g. W1,W3 (GW: the gateway section)"
    )
    parser.add_argument("--no-gateway", action="store_true", help="skip the gateway overhead section (GW)")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run in a few seconds")
    parser.add_argument("--workdir", type=Path, help="where the SQLite files go (default: a temp dir)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--repeat",
        type=int,
        default=0,
        metavar="N",
        help="run each workload N times per system and report the median (default: 3, 1 with --quick)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run everything in this process (faster to start; skews W4's peak-RSS delta)",
    )
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "WORKLOAD", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args
    chosen = [w.strip().upper() for w in args.only.split(",") if w.strip()] or [*WORKLOADS, GATEWAY]
    unknown = [w for w in chosen if w not in (*WORKLOADS, GATEWAY)]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}, GW")
    args.workloads = [w for w in chosen if w != GATEWAY]
    args.gateway = GATEWAY in chosen and not args.no_gateway
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    sizes = QUICK if args.quick else FULL
    repeat = args.repeat or (1 if args.quick else 3)
    sides, skipped = load_sides()
    for line in skipped:
        print(line, file=sys.stderr)

    own_dir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="tower-bench-")) if own_dir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": machine(),
        "versions": {},
        "sizes": asdict(sizes),
        "quick": args.quick,
        "repeat": repeat,
        "mode": "in-process" if args.in_process else "one child process per workload and system",
        "skipped": skipped,
        "results": {},
    }
    for _, _, module in sides:
        report["versions"].update(module.versions())
    failed = False
    try:
        for workload in args.workloads:
            report["results"][workload] = {}
            samples: dict[str, list[dict[str, Any]]] = {key: [] for key, _, _ in sides}
            for rep in range(repeat):
                for key, name, module in sides:
                    print(f"{workload} on {name} ({rep + 1}/{repeat}) ...", file=sys.stderr, flush=True)
                    if args.in_process:
                        data = run_one(module.WORKLOADS[workload], workdir, sizes)
                    else:
                        data = run_child(key, workload, workdir, args.quick)
                    samples[key].append(data)
            for key, runs in samples.items():
                merged = median_of(runs)
                failed = failed or "error" in merged
                report["results"][workload][key] = merged
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)

    for sides_data in report["results"].values():
        tower = sides_data.get("tower", {}).get("metrics", {})
        graph = sides_data.get("langgraph", {}).get("metrics", {})
        sides_data["ratio"] = {m: graph[m] / tower[m] for m in tower if graph.get(m) and tower[m]}

    if args.workloads:
        print_table(build_rows(report, sizes, full=not args.quick), collect_notes(report, sizes))
    print(
        "machine: "
        + ", ".join(f"{k}={v}" for k, v in report["machine"].items())
        + "\nversions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    )
    if args.gateway:
        report["gateway"] = run_gateway(args)
        failed = failed or "error" in report["gateway"]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
