"""What both sides of the benchmark share: workload sizes, results and the memory probe."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Sizes:
    w1_runs: int = 200
    w1_steps: int = 10
    w2_runs: int = 20
    w2_branches: int = 50
    w3_runs: int = 500
    w3_steps: int = 3
    w3_sleep: float = 0.2
    w4_runs: int = 1000


FULL = Sizes()
QUICK = Sizes(w1_runs=20, w2_runs=4, w2_branches=10, w3_runs=50, w3_sleep=0.05, w4_runs=50)


@dataclass
class Result:
    metrics: dict[str, float]
    notes: list[str] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)


def expect(condition: bool, message: str) -> None:
    """A correctness check on a workload's results (kept under ``python -O``, unlike assert)."""
    if not condition:
        raise RuntimeError(message)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryWatch:
    """Peak resident-set growth over a stretch of code, in MiB.

    On Linux the kernel's peak-RSS counter (VmHWM) is reset by writing ``5`` to
    /proc/self/clear_refs, so VmHWM after the stretch minus VmRSS before it is the
    peak growth. Where that is not possible, a thread samples VmRSS (or
    ``ru_maxrss`` as a last resort) every 5 ms.
    """

    def __init__(self) -> None:
        self.method = ""
        self._base = 0
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        base = _status_kib("VmRSS")
        if base is not None:
            try:
                _CLEAR_REFS.write_text("5")
            except OSError:
                pass
            else:
                if (_status_kib("VmHWM") or 0) <= base + 1024:
                    self.method = "peak RSS: /proc/self/status VmHWM (reset via clear_refs) - VmRSS"
                    self._base = base
                    return
            self.method = "peak RSS: VmRSS sampled every 5 ms - VmRSS before"
            self._base = self._peak = base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
            return
        import resource

        self.method = "ru_maxrss delta (process-lifetime peak; a lower bound)"
        self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            now = _status_kib("VmRSS") or 0
            self._peak = max(self._peak, now)

    def stop(self) -> float:
        """Peak growth since start(), in MiB."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _status_kib("VmRSS") or 0)
        elif self.method.startswith("peak RSS: /proc"):
            peak = _status_kib("VmHWM") or 0
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, peak - self._base) / 1024
