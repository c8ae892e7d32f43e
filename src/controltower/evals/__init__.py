"""Eval suites: run a workflow over cases with expected outcomes (format: FORMAT.md)."""

from controltower.evals.result import CaseResult, Failure, Regression, SuiteResult
from controltower.evals.runner import run_suite
from controltower.evals.suite import Suite, load_suite

__all__ = ["CaseResult", "Failure", "Regression", "Suite", "SuiteResult", "load_suite", "run_suite"]
