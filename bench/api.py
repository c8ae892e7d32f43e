"""Load test of the HTTP API on loopback: run starts and approval decisions (requests/s, p50, p99).

    .venv/bin/python -m bench.api [--count 400] [--concurrency 16] [--db URL] [--write]

Starts ``tower serve`` in a subprocess (engine workers in the same process, as in production)
on a free port over a fresh SQLite file (or --db), seeds a user and a token, publishes a
workflow whose only step is an approval, then measures, with ``--concurrency`` clients:
1. ``POST /v1/runs`` (each run parks at its approval), bounded by --count and --max-seconds;
2. ``POST /v1/approvals/step:<run>:sign_off/approve`` for those runs (each resumes and finishes).
``--write`` appends the results to bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SPEC = {
    "name": "bench-approval",
    "description": "One approval step: the cheapest run that exercises start, park and decide.",
    "steps": [{"id": "sign_off", "kind": "approval", "prompt": "OK?"}],
}
README = Path(__file__).with_name("README.md")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _seed(url: str) -> str:
    from controltower.auth import AuthService
    from controltower.store import open_store

    store = await open_store(url)
    try:
        auth = AuthService(store)
        principal = await auth.create_user("bench", "bench-admin", "bench password", ["admin"])
        return await auth.issue_token(principal, ["*"], 3600)
    finally:
        await store.close()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _phase(
    client: httpx.AsyncClient, requests: list[tuple[str, dict[str, object]]], concurrency: int, limit: float
) -> tuple[list[float], float, list[httpx.Response]]:
    latencies: list[float] = []
    responses: list[httpx.Response] = []
    queue = list(reversed(requests))
    deadline = time.monotonic() + limit

    async def worker() -> None:
        while queue and time.monotonic() < deadline:
            url, body = queue.pop()
            t0 = time.perf_counter()
            r = await client.post(url, json=body)
            latencies.append((time.perf_counter() - t0) * 1000)
            responses.append(r)
            if r.status_code >= 400:
                raise RuntimeError(f"{url}: {r.status_code} {r.text[:200]}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started, responses


async def bench(
    base: str, token: str, count: int, concurrency: int, limit: float
) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30, limits=limits) as client:
        for _ in range(200):
            try:
                if (await client.get("/v1/me")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("tower serve did not start; see its log")
        r = await client.post("/v1/workflows", json={"spec": SPEC})
        r.raise_for_status()
        starts = [("/v1/runs", {"workflow": SPEC["name"], "input": {"n": i}}) for i in range(count)]
        lat, wall, responses = await _phase(client, starts, concurrency, limit)
        results["run start (POST /v1/runs)"] = _summary(lat, wall)
        run_ids = [r.json()["id"] for r in responses]
        for _ in range(600):  # every run parked at its approval
            busy = await client.get("/v1/runs", params={"status": ["pending", "running"], "limit": 1})
            if not busy.json()["items"]:
                break
            await asyncio.sleep(0.1)
        decisions = [(f"/v1/approvals/step:{rid}:sign_off/approve", {"reason": "ok"}) for rid in run_ids]
        lat, wall, _ = await _phase(client, decisions, concurrency, limit)
        results["approval decision (POST /v1/approvals/{id}/approve)"] = _summary(lat, wall)
    return results


def run_bench(count: int, concurrency: int, db: str | None, limit: float) -> dict[str, dict[str, float]]:
    tmp = Path(tempfile.mkdtemp(prefix="tower-bench-api-"))
    url = db or f"sqlite:///{tmp}/tower.db"
    token = asyncio.run(_seed(url))
    port = _free_port()
    env = {**os.environ, "TOWER_DB_URL": url}
    with (tmp / "serve.log").open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "controltower.cli.main", "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            return asyncio.run(bench(f"http://127.0.0.1:{port}", token, count, concurrency, limit))
        finally:
            server.terminate()
            server.wait(30)


def _summary(latencies: list[float], wall: float) -> dict[str, float]:
    return {
        "requests": len(latencies),
        "rps": len(latencies) / wall if wall else 0.0,
        "p50": statistics.median(latencies),
        "p99": _pct(latencies, 0.99),
    }


def _table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| operation | requests | requests/s | p50 ms | p99 ms |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {int(r['requests'])} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--db", help="database URL (default: a fresh SQLite file)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time bound of each phase")
    parser.add_argument("--write", action="store_true", help="append the results to bench/README.md")
    args = parser.parse_args()
    results = run_bench(args.count, args.concurrency, args.db, args.max_seconds)
    table = _table(results)
    print(table)
    if args.write:
        backend = "PostgreSQL" if args.db and args.db.startswith("postgres") else "SQLite (FULL sync)"
        load = os.getloadavg()[0]
        with README.open("a") as f:
            f.write(
                "\n## HTTP API on loopback (bench/api.py)\n\n"
                f"`python -m bench.api --count {args.count} --concurrency {args.concurrency}`: "
                f"`tower serve` in a subprocess (uvicorn, one process, the engine's workers inside) over "
                f"{backend}; {args.concurrency} concurrent httpx clients on 127.0.0.1, bearer-token auth "
                "on every request (one token lookup each). A start creates the run and drives it to its "
                "approval step in the same process; a decision records the signal and resumes the run to "
                f"completion.\n\n{table}\n\n"
                f"Python {platform.python_version()}, {os.cpu_count()} vCPUs, load average {load:.2f} at "
                "the end (the machine is shared; figures move with the load). "
                f"Date {time.strftime('%Y-%m-%d')}.\n"
            )


if __name__ == "__main__":
    main()
