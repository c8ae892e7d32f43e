"""A request body size limit, enforced on the declared length and on the bytes actually sent."""

from __future__ import annotations

import json
import re

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controltower.api.problems import MEDIA_TYPE, PROBLEM_TYPE


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` past the limit; an HTTPException so FastAPI's body parsing re-raises it."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")


def _problem_body(limit: int) -> bytes:
    return json.dumps(
        {
            "type": PROBLEM_TYPE + "payload_too_large",
            "title": "Content Too Large",
            "status": 413,
            "detail": f"the request body is larger than {limit} bytes",
            "code": "payload_too_large",
            "hint": "send a smaller body (large inputs belong in files or object storage)",
        }
    ).encode()


class BodyLimitMiddleware:
    """Answers 413 (problem+json) before a too-large body is read into memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = False
            if too_big:
                await self._reject(send)
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        body = _problem_body(self.max_bytes)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", MEDIA_TYPE.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _has_lone_surrogate(value: object) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


class JsonTextGuard:
    """Rejects JSON bodies whose strings hold unpaired UTF-16 surrogates (``"\\ud800"``) with 422.

    They are valid JSON but not text: no database, log or model can store them. Only bodies that
    contain a ``\\ud8..``-``\\udf..`` escape (or its UTF-8 bytes) are parsed here; the rest pass untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([], message, receive), send)
                return
            chunks.append(message.get("body", b""))
            more = bool(message.get("more_body"))
        body = b"".join(chunks)
        if _SURROGATE_ESCAPE.search(body):
            try:
                parsed = json.loads(body)
            except (ValueError, RecursionError):
                parsed = None  # not JSON: the route's own parsing answers
            if _has_lone_surrogate(parsed):
                await _send_problem(
                    send,
                    422,
                    "invalid_input",
                    "the body holds a string with an unpaired UTF-16 surrogate (e.g. \\ud800)",
                    "send valid Unicode text",
                )
                return
        await self.app(scope, _replay([body], None, receive), send)


# an escaped surrogate, or one encoded as (invalid) UTF-8, which json.loads accepts too
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}|\xed[\xa0-\xbf]")


def _replay(chunks: list[bytes], then: Message | None, receive: Receive) -> Receive:
    """``receive`` for the app: the buffered body once, then the real channel (e.g. a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            if then is not None:
                return then
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return await receive()

    return replay


async def _send_problem(send: Send, status: int, code: str, detail: str, hint: str) -> None:
    body = json.dumps(
        {
            "type": PROBLEM_TYPE + code,
            "title": "Unprocessable Content",
            "status": status,
            "detail": detail,
            "code": code,
            "hint": hint,
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
