"""Users, roles, API tokens, browser sessions and tenants."""

from __future__ import annotations

from controltower.auth.errors import AuthError, PermissionDeniedError, TooManyAttemptsError
from controltower.auth.principal import PERMISSIONS, ROLES, Principal
from controltower.auth.service import DEFAULT_TENANT, AuthService, TokenInfo, UserInfo

__all__ = [
    "DEFAULT_TENANT",
    "PERMISSIONS",
    "ROLES",
    "AuthError",
    "AuthService",
    "PermissionDeniedError",
    "Principal",
    "TokenInfo",
    "TooManyAttemptsError",
    "UserInfo",
]
