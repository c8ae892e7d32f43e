"""``$ref`` resolution and OpenAPI-to-JSON-Schema conversion for the OpenAPI source.

Structural references (parameters, request bodies, responses, path items) are followed
in place. Schema references become ``#/$defs/<Name>`` with the target copied into the
tool's own ``$defs``: a recursive schema (a ticket that lists related tickets) stays
finite, and the tool's schema is self-contained. Only local references (``#/...``) are
supported; anything else, a dangling pointer or a reference loop is reported as an issue
that names where it was found.

OpenAPI 3.0 schemas are a JSON Schema dialect: ``nullable: true`` becomes a ``null``
type and boolean ``exclusiveMinimum``/``exclusiveMaximum`` become numbers, so validators
of the tool input (JSON Schema 2020-12) read them as the document meant.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Keys whose values are data, not schemas: never rewrite them.
_DATA_KEYS = frozenset({"example", "examples", "default", "enum", "const"})
_MAX_DEPTH = 64


class Resolver:
    def __init__(self, document: Mapping[str, Any], *, dialect_30: bool) -> None:
        self.document = document
        self.dialect_30 = dialect_30
        self.issues: list[str] = []

    def lookup(self, ref: Any, where: str) -> tuple[bool, Any]:
        """Follow one local JSON pointer; (False, None) and an issue when it does not resolve."""
        if not isinstance(ref, str) or not ref.startswith("#"):
            self.issues.append(f"{where}: $ref {ref!r} is not local; only '#/...' references are supported")
            return False, None
        node: Any = self.document
        pointer = ref[1:]
        for raw in pointer.split("/")[1:] if pointer else []:
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                self.issues.append(f"{where}: $ref {ref!r} does not resolve")
                return False, None
        return True, node

    def deref(self, node: Any, where: str) -> Any:
        """Follow ``$ref`` chains of a structural object (not a schema); loops are issues."""
        seen: set[str] = set()
        while isinstance(node, Mapping) and "$ref" in node:
            ref = node["$ref"]
            if ref in seen:
                self.issues.append(f"{where}: $ref {ref!r} refers to itself in a loop")
                return {}
            seen.add(ref)
            ok, node = self.lookup(ref, where)
            if not ok:
                return {}
        return node

    def schema(self, node: Any, where: str, defs: dict[str, Any], names: dict[str, str]) -> Any:
        """A JSON Schema for ``node``, its component references moved into ``defs``."""
        return self._convert(node, where, defs, names, 0)

    def _convert(self, node: Any, where: str, defs: dict[str, Any], names: dict[str, str], depth: int) -> Any:
        if depth > _MAX_DEPTH:
            self.issues.append(f"{where}: schema nests deeper than {_MAX_DEPTH} levels")
            return {}
        if isinstance(node, list):
            return [self._convert(item, where, defs, names, depth + 1) for item in node]
        if not isinstance(node, Mapping):
            return node
        if "$ref" in node:
            ref = node["$ref"]
            target_name = names.get(ref) if isinstance(ref, str) else None
            if target_name is None:
                ok, target = self.lookup(ref, where)
                if not ok:
                    return {}
                target_name = self._def_name(str(ref), defs, names)
                defs[target_name] = {}  # placeholder: a recursive reference finds the name already taken
                defs[target_name] = self._convert(target, f"{where} -> {ref}", defs, names, depth + 1)
            siblings = {} if self.dialect_30 else {k: v for k, v in node.items() if k != "$ref"}
            return {"$ref": f"#/$defs/{target_name}", **siblings}
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DATA_KEYS or str(key).startswith("x-"):
                out[key] = value
            elif key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"):
                out[key] = (
                    {k: self._convert(v, where, defs, names, depth + 1) for k, v in value.items()}
                    if isinstance(value, Mapping)
                    else value
                )
            else:
                out[key] = self._convert(value, where, defs, names, depth + 1)
        if self.dialect_30:
            _from_30(out)
        return out

    @staticmethod
    def _def_name(ref: str, defs: Mapping[str, Any], names: dict[str, str]) -> str:
        base = ref.rsplit("/", 1)[-1].replace("~1", "/").replace("~0", "~") or "Schema"
        candidate, counter = base, 2
        while candidate in defs:
            candidate, counter = f"{base}_{counter}", counter + 1
        names[ref] = candidate
        return candidate


def _from_30(schema: dict[str, Any]) -> None:
    if schema.pop("nullable", False) is True:
        kind = schema.get("type")
        if isinstance(kind, str):
            schema["type"] = [kind, "null"]
        elif isinstance(kind, list) and "null" not in kind:
            schema["type"] = [*kind, "null"]
        elif "enum" in schema and None not in schema["enum"]:
            schema["enum"] = [*schema["enum"], None]
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        flag = schema.get(bound)
        if isinstance(flag, bool):
            del schema[bound]
            if flag and limit in schema:
                schema[bound] = schema.pop(limit)


def media_schema(content: Any) -> Any:
    """The schema of the first media type of a ``content`` map (parameters may use one)."""
    if not isinstance(content, Mapping) or not content:
        return None
    media = next(iter(content.values()))
    return media.get("schema") if isinstance(media, Mapping) else None
