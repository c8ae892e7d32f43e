"""Authentication and authorisation errors (typed, with stable codes)."""

from __future__ import annotations

from controltower.spec.errors import TowerError


class AuthError(TowerError):
    """The caller is not authenticated: no, bad, expired or revoked credentials (HTTP 401)."""

    code = "unauthenticated"


class PermissionDeniedError(TowerError):
    """The caller is authenticated but its roles or scopes do not allow the action (HTTP 403)."""

    code = "forbidden"


class TooManyAttemptsError(AuthError):
    """Too many failed logins for one user in a short time (HTTP 429)."""

    code = "rate_limited"
