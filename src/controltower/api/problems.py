"""Every error as an RFC 9457 problem document (``application/problem+json``) with a stable code."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from controltower.spec.errors import SpecError, TowerError

log = logging.getLogger("controltower.api")

PROBLEM_TYPE = "urn:controltower:problem:"
MEDIA_TYPE = "application/problem+json"

# the HTTP status of each stable error code; anything else a caller caused is a 400
STATUS: dict[str, int] = {
    "unauthenticated": 401,
    "forbidden": 403,
    "not_found": 404,
    "unknown_tool": 404,
    "secret_not_found": 404,
    "impl_not_found": 422,
    "conflict": 409,
    "invalid_state": 409,
    "lease_lost": 409,
    "autonomy_change_refused": 409,
    "invalid_input": 422,
    "spec_invalid": 422,
    "expression_error": 422,
    "policy_invalid": 422,
    "policy_suite_invalid": 422,
    "secret_ref_invalid": 422,
    "tool_source_invalid": 422,
    "validation_error": 422,
    "malformed_json": 400,
    "payload_too_large": 413,
    "budget_exceeded": 402,
    "rate_limited": 429,
    "concurrency_limited": 429,
    "store_error": 503,
    "tool_unavailable": 503,
    "internal_error": 500,
}


class Problem(BaseModel):
    """An RFC 9457 problem document; ``code`` is stable, ``detail`` and ``hint`` are for people."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    hint: str | None = None
    instance: str | None = None


# documented on every /v1 route (the body is the same for every error status)
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": Problem, "content": {MEDIA_TYPE: {}}, "description": "A problem with the request"},
}


class ProblemResponse(JSONResponse):
    media_type = MEDIA_TYPE


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    title: str | None = None,
    hint: str | None = None,
    instance: str | None = None,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> ProblemResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE + code,
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if hint:
        body["hint"] = hint
    if instance:
        body["instance"] = instance
    if extra:
        body.update(extra)
    return ProblemResponse(body, status_code=status, headers=headers)


def tower_problem(exc: TowerError, instance: str | None = None) -> ProblemResponse:
    status = STATUS.get(exc.code, 400)
    extra: dict[str, Any] = {}
    if isinstance(exc, SpecError):
        extra["issues"] = [
            {"path": i.path, "message": i.message, "hint": i.hint, "line": i.line} for i in exc.issues
        ]
    headers = {"WWW-Authenticate": 'Bearer realm="controltower"'} if status == 401 else None
    return problem(
        status, exc.code, exc.message, hint=exc.hint, instance=instance, extra=extra, headers=headers
    )


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
}


def install(app: FastAPI) -> None:
    """Exception handlers: typed errors, validation errors, HTTP errors, and a last resort."""

    async def on_tower(request: Request, exc: Exception) -> ProblemResponse:
        assert isinstance(exc, TowerError)
        return tower_problem(exc, request.url.path)

    async def on_validation(request: Request, exc: Exception) -> ProblemResponse:
        assert isinstance(exc, RequestValidationError)
        errors = []
        malformed = False
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                malformed = True
            loc = ".".join(str(p) for p in err.get("loc", ()))
            errors.append({"loc": loc, "message": str(err.get("msg", "")), "type": str(err.get("type", ""))})
        if malformed:
            return problem(
                400,
                "malformed_json",
                "the request body is not valid JSON",
                hint="send a JSON document with Content-Type: application/json",
                instance=request.url.path,
            )
        first = errors[0] if errors else {"loc": "", "message": "invalid request"}
        return problem(
            422,
            "validation_error",
            f"{first['loc']}: {first['message']}" if first["loc"] else str(first["message"]),
            hint="fix the fields listed in 'errors'",
            instance=request.url.path,
            extra={"errors": errors},
        )

    async def on_http(request: Request, exc: Exception) -> ProblemResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        headers = dict(exc.headers) if exc.headers else None
        return problem(exc.status_code, code, detail, instance=request.url.path, headers=headers)

    async def on_data_error(request: Request, exc: Exception) -> ProblemResponse:
        # the database refused a value the request carried (PostgreSQL: a NUL character, a
        # string longer than its column): the caller's input, so a 422 rather than a 500
        log.info("database refused a value on %s %s: %s", request.method, request.url.path, exc.__class__)
        return problem(
            422,
            "invalid_input",
            "a value in the request cannot be stored (too long, or it contains a NUL character)",
            hint="shorten the value or remove control characters",
            instance=request.url.path,
        )

    async def on_unexpected(request: Request, exc: Exception) -> ProblemResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(
            500,
            "internal_error",
            "an unexpected error occurred; it has been logged",
            hint="please report it with the time of the request",
            instance=request.url.path,
        )

    app.add_exception_handler(TowerError, on_tower)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(sa.exc.DataError, on_data_error)
    app.add_exception_handler(Exception, on_unexpected)
