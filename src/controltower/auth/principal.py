"""Who is calling, and what each role may do.

A `Principal` is the authenticated caller of one request: a user logged in
through the dashboard, or a holder of an API token. Permissions are granted by
roles; an API token may narrow them further with scopes, never widen them.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES: tuple[str, ...] = ("admin", "operator", "approver", "viewer")

_READ: frozenset[str] = frozenset(
    {
        "specs:read",
        "runs:read",
        "approvals:read",
        "tools:read",
        "policies:read",
        "audit:read",
        "budgets:read",
        "kpis:read",
    }
)

PERMISSIONS: dict[str, frozenset[str]] = {
    "viewer": _READ,
    "approver": _READ | {"approvals:decide"},
    "operator": _READ
    | {
        "specs:publish",
        "runs:start",
        "runs:cancel",
        "runs:resume",
        "runs:signal",
        # as in the gateway's ApprovalBook: operators may decide (still limited by approval groups)
        "approvals:decide",
    },
    "admin": _READ
    | {
        "specs:publish",
        "runs:start",
        "runs:cancel",
        "runs:resume",
        "runs:signal",
        "approvals:decide",
        "audit:export",
        "users:manage",
        "tokens:manage",
    },
}

ALL_PERMISSIONS: frozenset[str] = frozenset().union(*PERMISSIONS.values())


@dataclass(frozen=True)
class Principal:
    """The caller of one request, always bound to exactly one tenant."""

    tenant: str
    subject: str
    roles: frozenset[str]
    groups: frozenset[str] = frozenset()
    # None: everything the roles allow; otherwise also limited to these scopes
    # ("runs:start", "runs:*" or "*")
    scopes: frozenset[str] | None = None
    token_id: str | None = None

    def can(self, permission: str) -> bool:
        if not any(permission in PERMISSIONS.get(role, frozenset()) for role in self.roles):
            return False
        if self.scopes is None or "*" in self.scopes or permission in self.scopes:
            return True
        family = permission.split(":", 1)[0]
        return f"{family}:*" in self.scopes

    def in_group(self, group: str | None) -> bool:
        """Whether this caller may decide approvals routed to ``group`` (admins decide any)."""
        return group is None or "admin" in self.roles or group in self.groups

    @property
    def permissions(self) -> frozenset[str]:
        return frozenset(p for p in ALL_PERMISSIONS if self.can(p))
