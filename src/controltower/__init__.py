"""Control Tower: a control plane for AI agents in durable, governed business workflows."""

__version__ = "0.1.0"
