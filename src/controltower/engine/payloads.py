"""Schema checks on the payloads that flow between steps."""

from __future__ import annotations

import functools
import json
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from controltower.spec.errors import StepFailure


@functools.lru_cache(maxsize=1024)
def _validator(schema_json: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_json))


def check_schema(value: Any, schema: dict[str, Any] | None, what: str) -> None:
    """Raise a non-retryable StepFailure naming the first problem when ``value`` breaks ``schema``."""
    if schema is None:
        return
    validator = _validator(json.dumps(schema, sort_keys=True))
    error = best_match(validator.iter_errors(value))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "<root>"
        raise StepFailure(f"{what} does not match its schema at {where}: {error.message}")
