"""Business numbers and (later) traces and metrics for workflows."""

from controltower.observability.kpis import KPIResult, compute_kpis

__all__ = ["KPIResult", "compute_kpis"]
