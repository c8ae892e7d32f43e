"""The HTTP side of the OpenAPI source: one request per tool call, built from ``source_ref``.

Kept apart from document parsing so a registry can rebuild an executor from a stored
:class:`ToolDefinition` alone. Failures are classified for the pipeline's retry logic:
4xx is the caller's fault (not retryable, except 408/425/429), 5xx and transport errors
are the server's or the network's (retryable).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

import httpx

from controltower.gateway.tools import ExecContext, Executor, ToolDefinition, ToolError

DEFAULT_TIMEOUT = 30.0
_RETRYABLE_4XX = frozenset({408, 425, 429})
_EXCERPT = 300
_MASK = "***"


def openapi_executor(definition: ToolDefinition, *, client: httpx.AsyncClient | None = None) -> Executor:
    """An executor for an imported operation; ``client`` is shared if given (the caller closes it)."""
    ref = definition.source_ref
    method = str(ref["method"]).upper()
    path = str(ref["path"])
    placement: list[dict[str, Any]] = list(ref.get("parameters") or [])
    body: dict[str, Any] | None = ref.get("body")
    security: list[list[dict[str, Any]]] = list(ref.get("security") or [])
    name = definition.name
    writes = definition.writes

    async def execute(args: dict[str, Any], ctx: ExecContext) -> Any:
        endpoint = ctx.endpoint
        if not endpoint:
            raise ToolError(
                f"tool {name} has no endpoint for environment {ctx.env!r}",
                hint="pass base_url when importing, set servers in the document, or bind an endpoint",
            )
        args = args or {}
        url = endpoint.rstrip("/") + _render_path(name, path, placement, args)
        query: list[tuple[str, str]] = []
        headers: dict[str, str] = {"Accept": "application/json, */*;q=0.5"}
        cookies: list[str] = []
        for param in placement:
            if param["in"] == "path" or param["property"] not in args or args[param["property"]] is None:
                continue
            value = args[param["property"]]
            if param["in"] == "query":
                query.extend(_query_pairs(param, value))
            elif param["in"] == "header":
                headers[param["name"]] = _scalar(value)
            else:
                cookies.append(f"{param['name']}={quote(_scalar(value), safe='')}")
        secrets = _apply_security(name, security, ctx, headers, query, cookies)
        if cookies:
            headers["Cookie"] = "; ".join(cookies)
        if writes:
            headers["Idempotency-Key"] = ctx.idempotency_key
        content: dict[str, Any] = {}
        if body is not None and args.get(body["property"]) is not None:
            content = _encode_body(body["media_type"], args[body["property"]], headers)
        timeout = ctx.timeout if ctx.timeout is not None else DEFAULT_TIMEOUT
        where = f"{method} {path}"
        try:
            if client is not None:
                response = await client.request(
                    method, url, params=tuple(query), headers=headers, timeout=timeout, **content
                )
            else:
                async with httpx.AsyncClient(timeout=timeout) as own:
                    response = await own.request(method, url, params=tuple(query), headers=headers, **content)
        except httpx.TimeoutException:
            raise ToolError(f"tool {name}: {where} timed out after {timeout}s", retryable=True) from None
        except httpx.TransportError as exc:
            detail = _mask(f"{type(exc).__name__}: {exc}", secrets)
            raise ToolError(
                f"tool {name}: {where} could not reach {endpoint}: {detail}",
                hint="check that the service is up and the environment's endpoint is right",
                retryable=True,
            ) from None
        return _result(name, where, response, secrets, ctx.env)

    return execute


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(_scalar(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k},{_scalar(v)}" for k, v in value.items())
    return str(value)


def _render_path(
    name: str, path: str, placement: Iterable[Mapping[str, Any]], args: Mapping[str, Any]
) -> str:
    rendered = path
    for param in placement:
        if param["in"] != "path":
            continue
        value = args.get(param["property"])
        if value is None:
            raise ToolError(
                f"tool {name}: missing path parameter {param['property']!r}",
                hint="pass every path parameter the input schema lists as required",
            )
        rendered = rendered.replace("{" + str(param["name"]) + "}", quote(_scalar(value), safe=""))
    return rendered


def _query_pairs(param: Mapping[str, Any], value: Any) -> list[tuple[str, str]]:
    name = str(param["name"])
    style = param.get("style", "form")
    explode = param.get("explode", style == "form")
    if isinstance(value, list | tuple):
        if explode:
            return [(name, _scalar(v)) for v in value]
        separator = {"spaceDelimited": " ", "pipeDelimited": "|"}.get(style, ",")
        return [(name, separator.join(_scalar(v) for v in value))]
    if isinstance(value, dict):
        if style == "deepObject":
            return [(f"{name}[{k}]", _scalar(v)) for k, v in value.items()]
        if explode:
            return [(str(k), _scalar(v)) for k, v in value.items()]
    return [(name, _scalar(value))]


def _apply_security(
    name: str,
    alternatives: list[list[dict[str, Any]]],
    ctx: ExecContext,
    headers: dict[str, str],
    query: list[tuple[str, str]],
    cookies: list[str],
) -> list[str]:
    """Inject the first satisfiable alternative; returns the secret values used (for masking)."""
    if not alternatives:
        return []
    chosen = next((alt for alt in alternatives if all(s["credential"] in ctx.credentials for s in alt)), None)
    if chosen is None:
        wanted = " or ".join("+".join(s["credential"] for s in alt) for alt in alternatives)
        example = alternatives[0][0]["credential"]
        raise ToolError(
            f"tool {name} needs credential {wanted} in environment {ctx.env!r}",
            hint=f"bind it in environments.{ctx.env}.credentials, e.g. {{{example!r}: 'env:VAR'}}; "
            "credentials are named after the document's security schemes",
        )
    used: list[str] = []
    for scheme in chosen:
        secret = ctx.credentials[scheme["credential"]]
        used.append(secret)
        kind = scheme.get("type")
        if kind == "apiKey":
            where = scheme.get("in")
            if where == "query":
                query.append((str(scheme["name"]), secret))
            elif where == "cookie":
                cookies.append(f"{scheme['name']}={quote(secret, safe='')}")
            else:
                headers[str(scheme["name"])] = secret
        elif kind == "http" and str(scheme.get("scheme", "")).lower() == "basic":
            token = secret if ":" not in secret else base64.b64encode(secret.encode()).decode()
            if ":" in secret:
                used.append(token)
            headers["Authorization"] = f"Basic {token}"
        elif kind == "http" and str(scheme.get("scheme", "bearer")).lower() != "bearer":
            headers["Authorization"] = f"{str(scheme['scheme']).capitalize()} {secret}"
        else:  # http bearer, oauth2, openIdConnect: an access token
            headers["Authorization"] = f"Bearer {secret}"
    return used


def _encode_body(media_type: str, value: Any, headers: dict[str, str]) -> dict[str, Any]:
    base = media_type.split(";")[0].strip().lower()
    if base == "application/json" or base.endswith("+json"):
        headers["Content-Type"] = media_type
        return {"content": json.dumps(value, separators=(",", ":")).encode()}
    if base == "application/x-www-form-urlencoded" and isinstance(value, dict):
        return {"data": {str(k): _scalar(v) for k, v in value.items()}}
    headers["Content-Type"] = media_type
    text = value if isinstance(value, str) else json.dumps(value)
    return {"content": text.encode()}


def _mask(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, _MASK)
    return text


def _result(name: str, where: str, response: httpx.Response, secrets: list[str], env: str) -> Any:
    status = response.status_code
    if 200 <= status < 300:
        if status == 204 or not response.content:
            return None
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/json" or content_type.endswith("+json"):
            try:
                return response.json()
            except ValueError:
                raise ToolError(f"tool {name}: {where} returned invalid JSON") from None
        return response.text
    excerpt = _mask(" ".join(response.text.split())[:_EXCERPT], secrets)
    message = f"tool {name}: {where} returned {status} {response.reason_phrase}" + (
        f": {excerpt}" if excerpt else ""
    )
    hint: str | None = None
    if status in (401, 403):
        hint = f"check the credentials bound for environment {env!r}"
    elif status == 404:
        hint = "check the identifiers passed to the tool"
    elif status == 429:
        retry_after = response.headers.get("retry-after")
        hint = f"rate limited; retry after {retry_after}s" if retry_after else "rate limited; retry later"
    elif 300 <= status < 400:
        hint = f"the service redirected to {response.headers.get('location')!r}; update the endpoint"
    raise ToolError(message, hint=hint, retryable=status >= 500 or status in _RETRYABLE_4XX)
