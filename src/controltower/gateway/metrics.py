"""Per-tool call metrics kept in process: counts by outcome and code, latency percentiles."""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ToolStats:
    calls: Counter[str] = field(default_factory=Counter)  # by status
    codes: Counter[str] = field(default_factory=Counter)  # denial / error codes
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))

    def percentile(self, p: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


class GatewayMetrics:
    def __init__(self) -> None:
        self.tools: dict[str, ToolStats] = defaultdict(ToolStats)

    def observe(self, tool: str, status: str, code: str | None, seconds: float) -> None:
        stats = self.tools[tool]
        stats.calls[status] += 1
        if code:
            stats.codes[code] += 1
        stats.latencies.append(seconds)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, stats in sorted(self.tools.items()):
            p50, p99 = stats.percentile(0.5), stats.percentile(0.99)
            out[name] = {
                "calls": dict(stats.calls),
                "codes": dict(stats.codes),
                "p50_ms": None if p50 is None else round(p50 * 1000, 3),
                "p99_ms": None if p99 is None else round(p99 * 1000, 3),
            }
        return out
