"""Workflow specs: the models, loading YAML with located errors, semantic checks, a builder.

Loading and building share one validation path, so every entry point reports the same
issues; import from here rather than from the submodules, whose layout may change.
"""

from controltower.spec.builder import (
    Workflow,
    agent_step,
    approval,
    delegate,
    loop,
    parallel,
    route,
    subworkflow,
    tool_step,
    wait,
)
from controltower.spec.errors import SpecError, SpecIssue
from controltower.spec.loader import MAX_SPEC_BYTES, load_spec_data, load_spec_file, load_spec_text
from controltower.spec.models import STEP_KINDS, Step, WorkflowSpec, children, iter_steps
from controltower.spec.validate import semantic_issues

__all__ = [
    "MAX_SPEC_BYTES",
    "STEP_KINDS",
    "SpecError",
    "SpecIssue",
    "Step",
    "Workflow",
    "WorkflowSpec",
    "agent_step",
    "approval",
    "children",
    "delegate",
    "iter_steps",
    "load_spec_data",
    "load_spec_file",
    "load_spec_text",
    "loop",
    "parallel",
    "route",
    "semantic_issues",
    "subworkflow",
    "tool_step",
    "wait",
]
