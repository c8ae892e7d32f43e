"""Signing webhook deliveries: HMAC-SHA256 over ``"{timestamp}.{body}"`` (sender and receiver).

No web framework here, so senders and tests can import it with the core install.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

from controltower.spec.errors import TowerError

TIMESTAMP_HEADER = "X-Tower-Timestamp"
SIGNATURE_HEADER = "X-Tower-Signature"
DELIVERY_HEADER = "X-Tower-Delivery"


class WebhookError(TowerError):
    """A rejected delivery: an HTTP status and a stable code the sender can act on."""

    def __init__(self, status: int, code: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.code = code


# -- signing (both sides) ----------------------------------------------------------------------


def signature(secret: str | bytes, timestamp: int | str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256(secret, ``"{timestamp}." + body``)."""
    key = secret.encode() if isinstance(secret, str) else secret
    mac = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def sign(
    secret: str | bytes,
    body: bytes | str | Any,
    *,
    timestamp: int | None = None,
    delivery_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Sign a delivery: returns ``(body_bytes, headers)`` ready to POST.

    ``body`` may be bytes, text, or a JSON-able value (serialised compactly).
    """
    if isinstance(body, bytes):
        raw = body
    elif isinstance(body, str):
        raw = body.encode()
    else:
        raw = json.dumps(body, separators=(",", ":")).encode()
    ts = int(time.time()) if timestamp is None else int(timestamp)
    headers = {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: str(ts),
        SIGNATURE_HEADER: signature(secret, ts, raw),
    }
    if delivery_id is not None:
        headers[DELIVERY_HEADER] = delivery_id
    return raw, headers


def verify(
    secret: str,
    body: bytes,
    timestamp: str | None,
    signatures: str | None,
    *,
    tolerance: float,
    now: float | None = None,
) -> int:
    """Check a delivery's signature and freshness; returns the timestamp or raises WebhookError(401)."""
    if not timestamp or not signatures:
        raise WebhookError(
            401,
            "signature_missing",
            f"the request needs the {TIMESTAMP_HEADER} and {SIGNATURE_HEADER} headers",
            hint="sign '<timestamp>.<body>' with HMAC-SHA256 (controltower.triggers.webhooks.sign)",
        )
    try:
        ts = int(timestamp.strip())
    except ValueError:
        raise WebhookError(401, "bad_timestamp", f"{TIMESTAMP_HEADER} must be Unix seconds") from None
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance:
        raise WebhookError(
            401,
            "stale_timestamp",
            f"the signed timestamp is {abs(current - ts):.0f}s from the server's clock; "
            f"the window is {tolerance:.0f}s",
            hint="sign each delivery when you send it; check the sender's clock",
        )
    expected = signature(secret, ts, body)
    offered = [s.strip() for s in signatures.split(",") if s.strip()]
    if not any(hmac.compare_digest(expected, s) for s in offered):
        raise WebhookError(401, "bad_signature", "the signature does not match the body and timestamp")
    return ts
