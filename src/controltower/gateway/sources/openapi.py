"""OpenAPI 3.x operations as governed tools.

Each operation becomes one tool: its path, query and header parameters and its JSON
request body (as ``body``) form the input schema, its 200/201 JSON response the output
schema. The HTTP method decides the side effect (GET/HEAD/OPTIONS read, POST/PUT/PATCH
write, DELETE irreversible) unless the operation says otherwise with ``x-side-effect``
/ ``x-risk``. Local ``$ref`` s are resolved; component schemas are carried as ``$defs``
so recursive schemas stay finite and valid.

Everything the executor needs (method, path, parameter placement, security schemes) is
kept in ``source_ref``, so :func:`openapi_executor` can rebuild an executor from a stored
definition. The base URL is the ``default`` environment binding; a ``dev`` binding can
point the same tool at a sandbox.

Credentials: an operation's security requirement names security schemes; the executor
reads a credential **with the scheme's name** from ``ctx.credentials`` (e.g. a scheme
``bearerAuth`` needs ``credentials["bearerAuth"]``). HTTP bearer, OAuth2 and OpenID
Connect send ``Authorization: Bearer <value>``; HTTP basic takes ``user:password``; apiKey
goes in the header, query or cookie the scheme names. Credential values are never
logged and are masked in error messages.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from controltower.gateway.sources._openapi_http import DEFAULT_TIMEOUT, openapi_executor
from controltower.gateway.sources._openapi_schema import Resolver, media_schema
from controltower.gateway.tools import (
    TOOL_NAME_PATTERN,
    Binding,
    Executor,
    Risk,
    SideEffect,
    ToolDefinition,
    ToolSourceError,
)

__all__ = ["DEFAULT_TIMEOUT", "import_openapi", "load_openapi_document", "openapi_executor"]

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_METHOD_EFFECT: dict[str, SideEffect] = {
    "get": "read",
    "head": "read",
    "options": "read",
    "trace": "read",
    "post": "write",
    "put": "write",
    "patch": "write",
    "delete": "irreversible",
}
_DEFAULT_RISK: dict[str, Risk] = {"read": "low", "write": "medium", "irreversible": "high"}
_SIDE_EFFECTS = ("read", "write", "irreversible")
_RISKS = ("low", "medium", "high", "critical")
_PARAM_LOCATIONS = ("path", "query", "header", "cookie")
_MAX_LISTED_ISSUES = 12
_NAME_RE = re.compile(TOOL_NAME_PATTERN)


def load_openapi_document(source: str | Path) -> dict[str, Any]:
    """Read an OpenAPI document from a JSON or YAML file."""
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ToolSourceError(f"cannot read OpenAPI document {str(path)!r}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() == ".json":
            loaded = json.loads(text)
        else:
            from ruamel.yaml import YAML
            from ruamel.yaml.error import YAMLError

            try:
                loaded = YAML(typ="safe", pure=True).load(text)
            except YAMLError as exc:
                raise ValueError(str(exc)) from None
    except ValueError as exc:
        raise ToolSourceError(f"OpenAPI document {str(path)!r} is not valid JSON/YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ToolSourceError(f"OpenAPI document {str(path)!r} must be a mapping at the top level")
    return loaded


def import_openapi(
    document: Mapping[str, Any] | str | Path,
    *,
    base_url: str | None = None,
    owner: str = "unowned",
    prefix: str | None = None,
    version: str | None = None,
    environments: Mapping[str, Binding] | None = None,
    client: httpx.AsyncClient | None = None,
) -> list[tuple[ToolDefinition, Executor]]:
    """Turn every operation of ``document`` into a (definition, executor) pair.

    ``version`` defaults to ``info.version``. ``environments`` adds bindings next to the
    ``default`` one (``base_url`` or ``servers[0].url``), e.g. ``{"dev": Binding(endpoint=...)}``.
    ``base_url`` replaces the server URL as a whole: include any base path (``.../api``).
    ``client``: an httpx client the executors share (the caller closes it); without one,
    each call opens and closes its own.
    """
    label = str(document) if isinstance(document, str | Path) else "<document>"
    doc = load_openapi_document(document) if isinstance(document, str | Path) else dict(document)
    issues: list[str] = []
    _check_root(doc, issues)
    if issues:
        _fail(label, issues)
    resolver = Resolver(doc, dialect_30=str(doc["openapi"]).startswith("3.0"))
    info = doc.get("info") if isinstance(doc.get("info"), dict) else {}
    tool_version = str(version or (info or {}).get("version") or "1")[:40]
    endpoint = base_url or _server_url(doc, issues)
    bindings: dict[str, Binding] = {"default": Binding(endpoint=endpoint)}
    bindings.update(environments or {})
    schemes = resolver.deref((doc.get("components") or {}).get("securitySchemes") or {}, "components")
    built: list[tuple[ToolDefinition, Executor]] = []
    names: dict[str, str] = {}
    for path, item_raw in doc["paths"].items():
        where_item = f"paths.{path}"
        item = resolver.deref(item_raw, where_item)
        if not isinstance(item, dict):
            issues.append(f"{where_item}: a path item must be a mapping")
            continue
        for method in METHODS:
            if method not in item:
                continue
            where = f"{where_item}.{method}"
            operation = item[method]
            if not isinstance(operation, dict):
                issues.append(f"{where}: an operation must be a mapping")
                continue
            definition = _definition(
                doc, resolver, str(path), method, item, operation, schemes, where, issues,
                owner=owner, prefix=prefix, version=tool_version, bindings=bindings,
            )  # fmt: skip
            if definition is None:
                continue
            if definition.name in names:
                issues.append(
                    f"{where}: tool name {definition.name!r} is already used by {names[definition.name]}"
                )
                continue
            names[definition.name] = where
            built.append((definition, openapi_executor(definition, client=client)))
    issues.extend(resolver.issues)
    if issues:
        _fail(label, issues)
    return built


def _fail(label: str, issues: list[str]) -> None:
    unique = list(dict.fromkeys(issues))
    listed = "; ".join(unique[:_MAX_LISTED_ISSUES])
    more = f"; ... and {len(unique) - _MAX_LISTED_ISSUES} more" if len(unique) > _MAX_LISTED_ISSUES else ""
    raise ToolSourceError(
        f"{len(unique)} problem(s) in OpenAPI document {label}: {listed}{more}",
        hint="fix the document (OpenAPI 3.x with local $refs only) and import it again",
    )


def _check_root(doc: Mapping[str, Any], issues: list[str]) -> None:
    openapi = doc.get("openapi")
    if openapi is None:
        if "swagger" in doc:
            issues.append("Swagger/OpenAPI 2.0 is not supported; convert the document to OpenAPI 3")
        else:
            issues.append("missing 'openapi' version field (expected 3.x)")
    elif not str(openapi).startswith("3."):
        issues.append(f"unsupported OpenAPI version {openapi!r} (expected 3.x)")
    if "paths" not in doc:
        issues.append("missing 'paths'")
    elif not isinstance(doc["paths"], dict):
        issues.append("'paths' must be a mapping of path -> path item")


def _server_url(doc: Mapping[str, Any], issues: list[str]) -> str | None:
    servers = doc.get("servers")
    if not isinstance(servers, list) or not servers or not isinstance(servers[0], dict):
        return None
    url = servers[0].get("url")
    if not isinstance(url, str):
        issues.append("servers[0].url must be a string")
        return None
    for var, spec in (servers[0].get("variables") or {}).items():
        default = spec.get("default") if isinstance(spec, dict) else None
        if default is None:
            issues.append(f"servers[0].variables.{var}: a default value is required")
            continue
        url = url.replace("{" + str(var) + "}", str(default))
    # A relative server URL ("/api") means "same host as the document": unknown here, so the
    # caller must pass base_url (the executor says so if it is missing).
    return url if re.match(r"^https?://", url, re.IGNORECASE) else None


def _tool_name(operation: Mapping[str, Any], method: str, path: str, prefix: str | None) -> str:
    raw = operation.get("operationId") or f"{method}_{path}"
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "_", str(raw)).strip("_.-")
    name = re.sub(r"_+", "_", name) or method
    if prefix:
        name = f"{prefix.rstrip('.')}.{name}"
    return name[:200]


def _definition(
    doc: Mapping[str, Any],
    resolver: Resolver,
    path: str,
    method: str,
    item: Mapping[str, Any],
    operation: Mapping[str, Any],
    schemes: Any,
    where: str,
    issues: list[str],
    *,
    owner: str,
    prefix: str | None,
    version: str,
    bindings: dict[str, Binding],
) -> ToolDefinition | None:
    defs: dict[str, Any] = {}
    refnames: dict[str, str] = {}
    properties: dict[str, Any] = {}
    required: list[str] = []
    placement: list[dict[str, Any]] = []
    merged: dict[tuple[str, str], Any] = {}
    for origin, params in (("path item", item.get("parameters")), ("operation", operation.get("parameters"))):
        if params is None:
            continue
        if not isinstance(params, list):
            issues.append(f"{where}: {origin} 'parameters' must be a list")
            continue
        for index, raw in enumerate(params):
            param = resolver.deref(raw, f"{where}.parameters[{index}]")
            if (
                not isinstance(param, dict)
                or not param.get("name")
                or param.get("in") not in _PARAM_LOCATIONS
            ):
                issues.append(
                    f"{where}.parameters[{index}]: needs 'name' and 'in' (one of {_PARAM_LOCATIONS})"
                )
                continue
            merged[(str(param["in"]), str(param["name"]))] = param
    taken = {name for _, name in merged}
    for (location, name), param in merged.items():
        prop = name if sum(1 for _, n in merged if n == name) == 1 else f"{location}_{name}"
        schema = param.get("schema")
        if schema is None:
            schema = media_schema(param.get("content"))
        prop_schema = resolver.schema(schema if schema is not None else {}, f"{where}.{name}", defs, refnames)
        if isinstance(prop_schema, dict) and param.get("description") and "description" not in prop_schema:
            prop_schema = {**prop_schema, "description": param["description"]}
        properties[prop] = prop_schema
        if location == "path" or param.get("required"):
            required.append(prop)
        entry: dict[str, Any] = {"name": name, "in": location, "property": prop}
        for key in ("style", "explode"):
            if key in param:
                entry[key] = param[key]
        placement.append(entry)
    for placeholder in re.findall(r"{([^}]+)}", path):
        if ("path", placeholder) not in merged:
            issues.append(f"{where}: path parameter {{{placeholder}}} is not declared in 'parameters'")
    body_ref: dict[str, Any] | None = None
    if "requestBody" in operation:
        body = resolver.deref(operation["requestBody"], f"{where}.requestBody")
        content = body.get("content") if isinstance(body, dict) else None
        if not isinstance(content, dict) or not content:
            issues.append(f"{where}.requestBody: needs 'content' with at least one media type")
        else:
            media_type = _pick_media_type(content)
            prop = "body" if "body" not in taken else "request_body"
            schema = (content.get(media_type) or {}).get("schema") or {}
            properties[prop] = resolver.schema(schema, f"{where}.requestBody", defs, refnames)
            if body.get("required"):
                required.append(prop)
            body_ref = {"property": prop, "media_type": media_type}
    input_schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        input_schema["required"] = required
    if defs:
        input_schema["$defs"] = defs
    effect = operation.get("x-side-effect", _METHOD_EFFECT[method])
    if effect not in _SIDE_EFFECTS:
        issues.append(f"{where}: x-side-effect must be one of {_SIDE_EFFECTS}, not {effect!r}")
        return None
    risk = operation.get("x-risk", _DEFAULT_RISK[effect])
    if risk not in _RISKS:
        issues.append(f"{where}: x-risk must be one of {_RISKS}, not {risk!r}")
        return None
    name = _tool_name(operation, method, path, prefix)
    if not _NAME_RE.match(name):
        issues.append(f"{where}: cannot derive a valid tool name from {name!r}")
        return None
    security = _security(doc, operation, schemes, where, issues)
    description = "\n\n".join(
        str(part).strip() for part in (operation.get("summary"), operation.get("description")) if part
    )
    source_ref: dict[str, Any] = {
        "method": method.upper(),
        "path": path,
        "operation_id": operation.get("operationId"),
        "parameters": placement,
        "body": body_ref,
        "security": security,
    }
    tags = tuple(str(t) for t in operation.get("tags") or () if isinstance(t, str | int))
    return ToolDefinition(
        name=name,
        version=version,
        owner=owner,
        description=description,
        input_schema=input_schema,
        output_schema=_output_schema(resolver, operation, where),
        side_effect=effect,
        risk=risk,
        environments=bindings,
        deprecated="marked deprecated in the OpenAPI document" if operation.get("deprecated") else None,
        source="openapi",
        source_ref=source_ref,
        tags=tags,
    )


def _pick_media_type(content: Mapping[str, Any]) -> str:
    for media_type in content:
        base = str(media_type).split(";")[0].strip().lower()
        if base == "application/json" or base.endswith("+json"):
            return str(media_type)
    for media_type in content:
        if str(media_type).startswith("application/x-www-form-urlencoded"):
            return str(media_type)
    return str(next(iter(content)))


def _output_schema(resolver: Resolver, operation: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    responses = operation.get("responses")
    if not isinstance(responses, dict):
        return None
    by_code = {str(code).upper(): response for code, response in responses.items()}
    order = ["200", "201", "202", *sorted(c for c in by_code if c.startswith("2") and c.isdigit()), "2XX"]
    for code in order:
        if code not in by_code:
            continue
        response = resolver.deref(by_code[code], f"{where}.responses.{code}")
        content = response.get("content") if isinstance(response, dict) else None
        if not isinstance(content, dict) or not content:
            return None
        media_type = _pick_media_type(content)
        base = media_type.split(";")[0].strip().lower()
        if base != "application/json" and not base.endswith("+json"):
            return None
        schema = (content.get(media_type) or {}).get("schema")
        if schema is None:
            return None
        defs: dict[str, Any] = {}
        converted = resolver.schema(schema, f"{where}.responses.{code}", defs, {})
        if not isinstance(converted, dict):
            return None
        if defs:
            converted = {**converted, "$defs": {**converted.get("$defs", {}), **defs}}
        return converted
    return None


def _security(
    doc: Mapping[str, Any], operation: Mapping[str, Any], schemes: Any, where: str, issues: list[str]
) -> list[list[dict[str, Any]]]:
    """Alternatives (any one suffices), each a list of schemes (all needed); [] = anonymous ok."""
    requirements = operation.get("security", doc.get("security")) or []
    if not isinstance(requirements, list):
        issues.append(f"{where}: 'security' must be a list of requirements")
        return []
    alternatives: list[list[dict[str, Any]]] = []
    for requirement in requirements:
        if not isinstance(requirement, dict):
            issues.append(f"{where}: each security requirement must be a mapping")
            continue
        needed: list[dict[str, Any]] = []
        for scheme_name in requirement:
            scheme = schemes.get(scheme_name) if isinstance(schemes, dict) else None
            if not isinstance(scheme, dict) or "type" not in scheme:
                issues.append(f"{where}: security scheme {scheme_name!r} is not defined in components")
                continue
            entry = {"credential": str(scheme_name), "type": scheme["type"]}
            for key in ("scheme", "in", "name"):
                if key in scheme:
                    entry[key] = scheme[key]
            if scheme["type"] == "apiKey" and (
                scheme.get("in") not in ("header", "query", "cookie") or not scheme.get("name")
            ):
                issues.append(
                    f"{where}: apiKey scheme {scheme_name!r} needs 'name' and 'in' (header/query/cookie)"
                )
            needed.append(entry)
        alternatives.append(needed)
    return alternatives
