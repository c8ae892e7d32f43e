"""Model names -> pydantic-ai models, and which name an llm agent uses.

Names are ``provider:model``. Settings come from the environment, never from a spec (so keys
stay out of specs, records and logs):

- ``openai:gpt-4o-mini`` — OpenAI Chat Completions; ``OPENAI_API_KEY``, optional ``OPENAI_BASE_URL``.
- ``ollama:llama3.2`` — ``OLLAMA_BASE_URL`` (default ``http://localhost:11434/v1``).
- ``openai-compatible:NAME`` — any OpenAI-compatible server (vLLM, llama.cpp, LM Studio, ...):
  ``TOWER_MODEL_BASE_URL``, optional ``TOWER_MODEL_API_KEY``.
- ``anthropic:claude-...`` (``ANTHROPIC_API_KEY``) and every other pydantic-ai provider
  (``google:``, ``groq:``, ``mistral:``, ...), built by pydantic-ai itself.

Tests and embedding applications can put their own models in front: :func:`override_models`.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from controltower.models.errors import ModelConfigError, ModelsNotInstalledError
from controltower.spec.models import MODEL_NAME_PATTERN

if TYPE_CHECKING:
    from pydantic_ai.models import Model

    from controltower.spec.models import AgentSpec, WorkflowSpec

DEFAULT_OLLAMA_URL = "http://localhost:11434/v1"
_NAME = re.compile(MODEL_NAME_PATTERN)
_EXTRAS = {"openai": "openai", "ollama": "openai", "openai-compatible": "openai", "anthropic": "anthropic"}

_lock = threading.Lock()
_overrides: list[tuple[Mapping[str, Any], Any]] = []  # stack of (named models, default model)
_built: dict[str, Any] = {}


def require_llm() -> None:
    """Raise :class:`ModelsNotInstalledError` unless pydantic-ai is importable."""
    try:
        import pydantic_ai  # noqa: F401
    except ImportError:
        raise ModelsNotInstalledError("LLM agents", "llm") from None


@contextmanager
def override_models(
    models: Mapping[str, Model] | None = None, *, default: Model | None = None
) -> Iterator[None]:
    """Serve model names from ``models`` (and every llm agent from ``default``) inside the block.

    ``default`` also counts as a configured model, so agents with ``offline:`` use it instead.
    Process-wide (the engine runs steps on its own tasks), so do not nest it across threads.
    """
    entry = (dict(models or {}), default)
    with _lock:
        _overrides.append(entry)
    try:
        yield
    finally:
        with _lock:
            _overrides.remove(entry)


def _overridden(name: str | None) -> Any:
    with _lock:
        for named, default in reversed(_overrides):
            if name is not None and name in named:
                return named[name]
            if default is not None:
                return default
    return None


def has_default_override() -> bool:
    with _lock:
        return any(default is not None for _, default in _overrides)


def configured_model(agent: AgentSpec, spec: WorkflowSpec | None) -> str | None:
    """The model name an llm agent uses: its own, else the workflow's, else ``TOWER_MODEL``."""
    name = agent.model or (spec.model if spec is not None else None) or os.environ.get("TOWER_MODEL") or None
    if name is None and has_default_override():
        return "test:override"
    if name is not None and not _NAME.match(name):
        raise ModelConfigError(
            f"model name {name!r} is not 'provider:model'",
            hint="e.g. openai:gpt-4o-mini, ollama:llama3.2, openai-compatible:NAME, "
            "anthropic:claude-sonnet-4-5",
        )
    return name


def build_model(name: str) -> Model:
    """The pydantic-ai model for ``name`` (cached per name: providers hold HTTP connections)."""
    found = _overridden(name)
    if found is not None:
        return found  # type: ignore[no-any-return]
    require_llm()
    with _lock:
        cached = _built.get(name)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    model = _build(name)
    with _lock:
        _built.setdefault(name, model)
        return _built[name]  # type: ignore[no-any-return]


def _build(name: str) -> Model:
    from pydantic_ai.exceptions import UserError

    provider, _, model_name = name.partition(":")
    try:
        if provider == "openai":
            from pydantic_ai.models.openai import OpenAIChatModel
            from pydantic_ai.providers.openai import OpenAIProvider

            return OpenAIChatModel(model_name, provider=OpenAIProvider())
        if provider == "ollama":
            from pydantic_ai.models.ollama import OllamaModel
            from pydantic_ai.providers.ollama import OllamaProvider

            base_url = os.environ.get("OLLAMA_BASE_URL") or DEFAULT_OLLAMA_URL
            return OllamaModel(model_name, provider=OllamaProvider(base_url=base_url))
        if provider == "openai-compatible":
            from pydantic_ai.models.openai import OpenAIChatModel
            from pydantic_ai.providers.openai_compatible import OpenAICompatibleProvider

            compat_url = os.environ.get("TOWER_MODEL_BASE_URL")
            if not compat_url:
                raise ModelConfigError(
                    f"model {name!r} needs the server's base URL",
                    hint="set TOWER_MODEL_BASE_URL, e.g. http://localhost:8000/v1 "
                    "(and TOWER_MODEL_API_KEY if needed)",
                )
            compat = OpenAICompatibleProvider(
                "openai-compatible", base_url=compat_url, api_key=os.environ.get("TOWER_MODEL_API_KEY")
            )
            return OpenAIChatModel(model_name, provider=compat)
        from pydantic_ai.models import infer_model

        return infer_model(name)
    except ImportError:
        extra = _EXTRAS.get(provider)
        if extra is None:  # another pydantic-ai provider: its own extra of pydantic-ai-slim
            raise ModelsNotInstalledError(
                f"model {name!r}", "llm", package=f"pydantic-ai-slim[{provider}]"
            ) from None
        raise ModelsNotInstalledError(f"model {name!r}", extra) from None
    except UserError as exc:
        # pydantic-ai's messages name the missing environment variable, never its value
        raise ModelConfigError(f"model {name!r} cannot be used: {exc}") from None


def clear_cache() -> None:
    """Forget built models (after changing their environment variables)."""
    with _lock:
        _built.clear()
