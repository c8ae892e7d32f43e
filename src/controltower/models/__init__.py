"""Models for llm agents: configured by name, priced, charged to budgets, recorded durably.

Importing this package needs no model library; building a model or running an llm agent needs
the ``llm`` extra (pydantic-ai) and, per provider, ``openai`` or ``anthropic``. Test doubles:
:mod:`controltower.models.testing`.
"""

from controltower.models.calls import ModelCallLog, ModelCallRecord, ModelUsage
from controltower.models.errors import (
    InvalidModelOutputError,
    ModelBudgetExceededError,
    ModelConfigError,
    ModelNotConfiguredError,
    ModelsNotInstalledError,
    ModelUnavailableError,
    RemoteAgentError,
)
from controltower.models.prices import Price, PriceTable
from controltower.models.registry import build_model, configured_model, override_models

__all__ = [
    "InvalidModelOutputError",
    "ModelBudgetExceededError",
    "ModelCallLog",
    "ModelCallRecord",
    "ModelConfigError",
    "ModelNotConfiguredError",
    "ModelUnavailableError",
    "ModelUsage",
    "ModelsNotInstalledError",
    "Price",
    "PriceTable",
    "RemoteAgentError",
    "build_model",
    "configured_model",
    "override_models",
]
