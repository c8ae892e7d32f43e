"""Opaque cursors and the page envelope every list endpoint returns."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from controltower.spec.errors import InvalidInputError

T = TypeVar("T")

MAX_LIMIT = 200


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


def encode_cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> Any:
    if cursor is None or cursor == "":
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, UnicodeError, binascii.Error):
        raise InvalidInputError(
            "invalid cursor", hint="pass the next_cursor of the previous page unchanged"
        ) from None


def cursor_of(value: Any, expected: type) -> Any:
    """The decoded cursor if it has the expected type, else an invalid-input error."""
    decoded = decode_cursor(value)
    if decoded is not None and (not isinstance(decoded, expected) or isinstance(decoded, bool)):
        raise InvalidInputError("invalid cursor", hint="pass the next_cursor of the previous page unchanged")
    return decoded
