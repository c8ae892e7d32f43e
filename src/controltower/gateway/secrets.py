"""Credentials scoped per tool and environment, and redaction of them wherever they could leak.

A tool's binding names its credentials by *reference* only (``env:NAME`` or
``file:/path``); the value is read at execution time and handed to that tool's executor
alone. Every value read is registered with a :class:`Redactor`, which the audit log and
the log filter use so that a secret echoed back by a tool, an exception or a log line
is masked before it is stored or printed.

Errors never contain a secret value, and a reference that is neither form is refused
without echoing it back: a literal secret pasted where a reference belongs must not end
up in an error message or a log.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import re
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from controltower.gateway.tools import ToolDefinition
from controltower.spec.errors import TowerError

MASK = "[REDACTED]"
MIN_SECRET_LENGTH = 4
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FORMS = "'env:NAME' (an environment variable) or 'file:/absolute/path' (a file holding the value)"


class SecretError(TowerError):
    code = "secret_error"


class SecretNotFound(SecretError):
    """The reference is well formed but names nothing: an unset variable or a missing file."""

    code = "secret_not_found"


class SecretUnreadable(SecretError):
    """The file exists but cannot be read as text (permissions, a directory, not UTF-8)."""

    code = "secret_unreadable"


class SecretRefInvalid(SecretError):
    """The reference is not ``env:NAME`` or ``file:/path`` — possibly a literal secret."""

    code = "secret_ref_invalid"


# -- resolving references ------------------------------------------------------------------


def resolve_secret(ref: str, *, redactor: Redactor | None = None) -> str:
    """Read the value ``ref`` points to and register it with ``redactor`` (default: the process one).

    ``env:NAME`` reads ``os.environ[NAME]``; ``file:/path`` reads the file and strips one
    trailing newline. An empty value counts as missing: it is always a mistake.
    """
    value = _read(ref)
    (redactor if redactor is not None else default_redactor()).register(value)
    return value


def _read(ref: str) -> str:
    if not isinstance(ref, str):
        raise SecretRefInvalid(f"a credential reference must be a string of the form {_FORMS}")
    scheme, sep, rest = ref.partition(":")
    if sep and scheme == "env":
        return _read_env(rest)
    if sep and scheme == "file":
        return _read_file(rest)
    raise SecretRefInvalid(
        "a credential reference must be " + _FORMS + "; the value given is neither (not shown, "
        "in case it is a secret)",
        hint="put the secret in an environment variable or a file and reference it",
    )


def _read_env(name: str) -> str:
    if not _ENV_NAME.match(name):
        # not echoed: 'env:' followed by something that is not a variable name may be a secret
        raise SecretRefInvalid(
            "an 'env:' reference must name an environment variable (letters, digits, '_'; "
            "not starting with a digit); the name given is not valid (not shown)",
            hint="use env:MY_TOOL_TOKEN and export MY_TOOL_TOKEN",
        )
    value = os.environ.get(name)
    if value is None:
        raise SecretNotFound(
            f"environment variable {name} is not set", hint=f"export {name} in the engine's environment"
        )
    if value == "":
        raise SecretNotFound(f"environment variable {name} is empty", hint=f"set {name} to the credential")
    return value


def _read_file(raw: str) -> str:
    path = Path(raw).expanduser()
    if not raw or not path.is_absolute():
        raise SecretRefInvalid(
            "a 'file:' reference must be an absolute path (e.g. file:/run/secrets/crm_token)",
            hint="relative paths would depend on the working directory",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SecretNotFound(f"secret file {path} does not exist", hint="create it or fix the path") from None
    except IsADirectoryError:
        raise SecretUnreadable(
            f"secret file {path} is a directory", hint="point at the file itself"
        ) from None
    except PermissionError:
        raise SecretUnreadable(
            f"secret file {path} is not readable by this process", hint="check its owner and mode"
        ) from None
    except UnicodeDecodeError:
        raise SecretUnreadable(f"secret file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise SecretUnreadable(f"secret file {path} cannot be read: {exc.strerror}") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if text == "":
        raise SecretNotFound(f"secret file {path} is empty", hint="write the credential into it")
    return text


# -- redaction -------------------------------------------------------------------------------

_SECRET_WORDS = frozenset(
    {"password", "passwd", "passphrase", "secret", "authorization", "cookie", "apikey", "credential"}
)
_SECRET_PAIRS = frozenset({("api", "key"), ("private", "key"), ("access", "key"), ("session", "key")})
_WORD_SPLIT = re.compile(r"[^a-z0-9]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


@functools.lru_cache(maxsize=4096)  # the same few keys come back on every record
def is_secret_key(key: str) -> bool:
    """Whether a mapping key names a secret: password, token, api_key, secret, authorization, cookie...

    Matching is by word, case-insensitive, across ``snake_case``, ``kebab-case`` and
    ``camelCase``: ``X-Api-Key``, ``client_secret``, ``accessToken`` and ``Set-Cookie`` match.
    ``token`` only matches as the *last* word, so usage counters such as ``input_tokens`` or
    ``token_count`` are left alone.
    """
    words = [w for w in _WORD_SPLIT.split(_CAMEL.sub("_", key).lower()) if w]
    if not words:
        return False
    if words[-1] == "token":
        return True
    for word in words:
        if word in _SECRET_WORDS or word.rstrip("s") in _SECRET_WORDS:
            return True
    return any(pair in _SECRET_PAIRS for pair in itertools.pairwise(words))


class Redactor:
    """Masks registered secret values in text and nested data; safe to share between threads.

    Values shorter than :data:`MIN_SECRET_LENGTH` characters are not registered: masking
    every "a" or "42" would destroy ordinary text while protecting nothing (such a value
    is guessable anyway). Alongside each value its URL-encoded and JSON-escaped forms are
    registered, since that is how a secret usually reappears inside a URL or a JSON body.
    """

    def __init__(self, secrets: list[str] | None = None, *, mask: str = MASK) -> None:
        self.mask = mask
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        for value in secrets or ():
            self.register(value)

    def register(self, value: str) -> bool:
        """Add ``value`` (and its encoded forms); False if it is too short to be masked safely."""
        if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH:
            return False
        forms = {value, urllib.parse.quote(value, safe=""), json.dumps(value)[1:-1]}
        with self._lock:
            if forms <= self._values:
                return True
            self._values |= forms
            ordered = sorted(self._values, key=len, reverse=True)  # longest first: no partial masks
            self._pattern = re.compile("|".join(re.escape(v) for v in ordered))
        return True

    def redact_text(self, text: str) -> str:
        """``text`` with every registered value replaced by the mask."""
        pattern = self._pattern  # read once: register() swaps it atomically
        if pattern is None or not text:
            return text
        return pattern.sub(self.mask, text)

    def redact(self, obj: Any) -> Any:
        """A redacted copy of ``obj``: strings, mapping keys and values, lists and tuples, recursively.

        The value under a key that looks secret (see :func:`is_secret_key`) is replaced by
        the mask whatever it is, unless it is None or empty. Other objects are returned as is.
        """
        return self._redact(obj, 0)

    def _redact(self, obj: Any, depth: int) -> Any:
        if isinstance(obj, str):
            return self.redact_text(obj)
        if depth > 100:  # pathological nesting: refuse to walk further, but never leak
            return self.mask
        if isinstance(obj, Mapping):
            out: dict[Any, Any] = {}
            for key, value in obj.items():
                new_key = self.redact_text(key) if isinstance(key, str) else key
                if isinstance(key, str) and is_secret_key(key) and value not in (None, ""):
                    out[new_key] = self.mask
                else:
                    out[new_key] = self._redact(value, depth + 1)
            return out
        if isinstance(obj, list):
            return [self._redact(item, depth + 1) for item in obj]
        if isinstance(obj, tuple):
            return tuple(self._redact(item, depth + 1) for item in obj)
        return obj


_DEFAULT = Redactor()


def default_redactor() -> Redactor:
    """The process-wide redactor used when none is passed: secure by default."""
    return _DEFAULT


# -- logging ---------------------------------------------------------------------------------


class RedactingFilter(logging.Filter):
    """Redacts a record's message, arguments, exception text and stack before any handler sees it.

    The message is formatted once (``msg % args``), redacted, and stored back with the
    arguments cleared, so secrets inside any argument type (an exception, an object's
    ``repr``) are caught. Mapping arguments get key-based masking first.
    """

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor if redactor is not None else default_redactor()

    def filter(self, record: logging.LogRecord) -> bool:
        red = self.redactor
        if isinstance(record.args, Mapping):
            record.args = red.redact(record.args)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it, redact what we can
            record.msg = red.redact_text(str(record.msg))
            return True
        record.msg = red.redact_text(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = red.redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = red.redact_text(record.stack_info)
        return True


def install_log_redaction(
    redactor: Redactor | None = None, *, logger: str = "controltower"
) -> Callable[[], None]:
    """Redact everything logged under ``logger``; returns a function that removes the filter again.

    A logger's own filters do not apply to records from its child loggers, so the filter
    is added to the logger *and* to every handler those records reach now (the logger's,
    then its ancestors' while ``propagate`` is set, which includes the root handlers).
    Handlers added later need ``handler.addFilter(...)`` or another call of this function.
    """
    filt = RedactingFilter(redactor)
    target = logging.getLogger(logger)
    owners: list[logging.Filterer] = [target]
    current: logging.Logger | None = target
    while current is not None:
        owners.extend(current.handlers)
        current = current.parent if current.propagate else None
    for owner in owners:
        owner.addFilter(filt)

    def uninstall() -> None:
        for owner in owners:
            owner.removeFilter(filt)

    return uninstall


# -- per-tool scopes -------------------------------------------------------------------------


class SecretScope:
    """The credentials of one tool in one environment, and nothing else.

    Only ``tool.binding(env).credentials`` are read: a dev run of a tool never sees its
    prod credentials, and a tool never sees another tool's. Values are read afresh on
    every :meth:`resolve` (files and variables may be rotated) and registered with the
    redactor.
    """

    def __init__(self, tool: ToolDefinition, env: str, redactor: Redactor | None = None) -> None:
        self.tool = tool
        self.env = env
        self.redactor = redactor if redactor is not None else default_redactor()

    @property
    def refs(self) -> dict[str, str]:
        """Credential name -> reference (references are not secret)."""
        return dict(self.tool.binding(self.env).credentials)

    def resolve(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, ref in self.refs.items():
            try:
                out[name] = resolve_secret(ref, redactor=self.redactor)
            except SecretError as exc:
                raise type(exc)(
                    f"tool {self.tool.name!r} credential {name!r} ({self.env}): {exc.message}", hint=exc.hint
                ) from None
        return out

    def __repr__(self) -> str:
        return f"SecretScope(tool={self.tool.name!r}, env={self.env!r}, names={sorted(self.refs)})"
