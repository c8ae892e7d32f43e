"""What model calls cost: integer micro-dollars per million tokens, per model name.

The table is, in order: the user's overrides (a workflow's ``model_prices``, a file named by
``TOWER_MODEL_PRICES``, or :meth:`PriceTable.with_prices`), then zero for local servers
(``ollama:``, ``openai-compatible:``, test models), then the price snapshot bundled with
``genai-prices`` (installed with the ``llm`` extra; never downloaded at run time). A model found
nowhere costs 0 and is logged once, so a budget in money never silently blocks it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

from controltower.spec.errors import InvalidInputError

log = logging.getLogger("controltower.models")

LOCAL_PROVIDERS = frozenset({"ollama", "openai-compatible", "test", "scripted", "function"})
# our provider names -> genai-prices provider ids
_GENAI_PROVIDERS = {
    "openai": "openai",
    "openai-responses": "openai",
    "openai-chat": "openai",
    "anthropic": "anthropic",
    "google": "google",
    "groq": "groq",
    "mistral": "mistral",
    "deepseek": "deepseek",
    "xai": "x-ai",
}


@dataclass(frozen=True, slots=True)
class Price:
    """Micro-dollars per million input and output tokens (150000 = $0.15 per 1M tokens)."""

    input: int
    output: int
    source: str = "override"

    def cost(self, input_tokens: int, output_tokens: int) -> int:
        """Micro-dollars for one call, rounded up so a budget is never under-charged."""
        total = Decimal(input_tokens * self.input + output_tokens * self.output) / 1_000_000
        return int(total.to_integral_value(rounding=ROUND_CEILING))


def _price(name: str, value: Any, source: str) -> Price:
    if isinstance(value, Price):
        return value
    data = value.model_dump() if hasattr(value, "model_dump") else value
    if not isinstance(data, Mapping) or set(data) != {"input", "output"}:
        raise InvalidInputError(
            f"price of {name!r} must be {{input: N, output: N}} (micro-dollars per 1M tokens), got {value!r}"
        )
    numbers = [data["input"], data["output"]]
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in numbers):
        raise InvalidInputError(
            f"prices of {name!r} must be whole numbers >= 0 (micro-dollars per 1M tokens)"
        )
    return Price(int(data["input"]), int(data["output"]), source)


class PriceTable:
    def __init__(self, prices: Mapping[str, Any] | None = None, *, use_snapshot: bool = True) -> None:
        self._prices = {name: _price(name, value, "override") for name, value in (prices or {}).items()}
        self._use_snapshot = use_snapshot

    @classmethod
    def from_file(cls, path: str | Path) -> PriceTable:
        """A YAML or JSON mapping ``model name -> {input: N, output: N}``."""
        file = Path(path)
        try:
            text = file.read_text()
        except OSError as exc:
            raise InvalidInputError(f"cannot read price file {file}: {exc.strerror}") from None
        if file.suffix == ".json":
            data = json.loads(text)
        else:
            from ruamel.yaml import YAML

            data = YAML(typ="safe").load(text)
        if not isinstance(data, Mapping):
            raise InvalidInputError(f"price file {file} must map model names to {{input, output}}")
        return cls(data)

    @classmethod
    def default(cls) -> PriceTable:
        """The table with the overrides of ``TOWER_MODEL_PRICES`` (a file path), if set."""
        path = os.environ.get("TOWER_MODEL_PRICES")
        if not path:
            return _PLAIN
        try:
            stamp = Path(path).stat().st_mtime_ns
        except OSError:
            stamp = 0  # from_file reports the problem
        return _from_file_cached(path, stamp)

    def with_prices(self, prices: Mapping[str, Any]) -> PriceTable:
        """A copy with more overrides (e.g. a workflow's ``model_prices``), which win."""
        if not prices:
            return self
        table = PriceTable(use_snapshot=self._use_snapshot)
        table._prices = {**self._prices, **{n: _price(n, v, "override") for n, v in prices.items()}}
        return table

    def price(self, model: str) -> Price | None:
        found = self._prices.get(model)
        if found is not None:
            return found
        provider, _, name = model.partition(":")
        if provider in LOCAL_PROVIDERS:
            return Price(0, 0, "local")
        if self._use_snapshot and provider in _GENAI_PROVIDERS:
            return _snapshot_price(_GENAI_PROVIDERS[provider], name)
        return None

    def cost(self, model: str, input_tokens: int, output_tokens: int) -> int:
        price = self.price(model)
        if price is None:
            _warn_unpriced(model)
            return 0
        return price.cost(input_tokens, output_tokens)


_PLAIN = PriceTable()


@functools.lru_cache(maxsize=8)
def _from_file_cached(path: str, stamp: int) -> PriceTable:
    return PriceTable.from_file(path)


@functools.lru_cache(maxsize=256)
def _snapshot_price(provider: str, model: str) -> Price | None:
    try:
        from genai_prices import Usage, calc_price
    except ImportError:
        return None
    try:
        per_input = calc_price(Usage(input_tokens=1_000_000), model_ref=model, provider_id=provider)
        per_output = calc_price(Usage(output_tokens=1_000_000), model_ref=model, provider_id=provider)
    except LookupError:
        return None
    return Price(
        int(Decimal(per_input.total_price) * 1_000_000),
        int(Decimal(per_output.total_price) * 1_000_000),
        "genai-prices",
    )


@functools.lru_cache(maxsize=256)
def _warn_unpriced(model: str) -> None:
    log.warning(
        "no price for model %s: its calls are charged 0 (set TOWER_MODEL_PRICES or model_prices)", model
    )
