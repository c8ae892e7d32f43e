"""`AuthService`: tenants, users, API tokens and browser sessions, stored in the Store.

Secrets are never stored: passwords as scrypt hashes, API tokens and session ids
as SHA-256 hashes (they are long random values, so a fast hash is enough). A
token is shown once, when issued; afterwards only its id and metadata exist.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from controltower.auth.errors import AuthError, TooManyAttemptsError
from controltower.auth.passwords import dummy_hash, hash_password, verify_password
from controltower.auth.principal import ALL_PERMISSIONS, ROLES, Principal
from controltower.spec.errors import ConflictError, InvalidInputError, NotFoundError
from controltower.spec.ids import new_id
from controltower.store import tables as t
from controltower.store.sql import SqlStore

DEFAULT_TENANT = "default"
SESSION_TTL = 8 * 3600.0
MAX_TOKEN_TTL = 366 * 86400.0
MIN_PASSWORD = 8
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,199}$")
_GROUP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")
_TOUCH_EVERY = 60.0
# failed logins per (tenant, username) within the window before further attempts are refused
MAX_FAILED_LOGINS = 10
FAILED_LOGIN_WINDOW = 300.0


@dataclass(frozen=True)
class UserInfo:
    tenant: str
    username: str
    roles: tuple[str, ...]
    groups: tuple[str, ...]
    disabled: bool
    created_at: float


@dataclass(frozen=True)
class TokenInfo:
    """What is kept about an API token (never the token itself)."""

    id: str
    tenant: str
    subject: str
    roles: tuple[str, ...]
    groups: tuple[str, ...]
    scopes: tuple[str, ...]
    description: str | None
    created_at: float
    expires_at: float
    revoked_at: float | None
    last_used_at: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None and self.expires_at > time.time()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_tenant(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidInputError(
            f"invalid tenant name {name!r}",
            hint="use 1-64 lower-case letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    return name


def check_roles(roles: Iterable[str]) -> frozenset[str]:
    chosen = frozenset(roles)
    unknown = sorted(chosen - set(ROLES))
    if unknown:
        raise InvalidInputError(f"unknown role(s) {', '.join(unknown)}", hint=f"roles are {', '.join(ROLES)}")
    if not chosen:
        raise InvalidInputError("a user needs at least one role", hint=f"roles are {', '.join(ROLES)}")
    return chosen


def check_groups(groups: Iterable[str]) -> frozenset[str]:
    chosen = frozenset(groups)
    for group in chosen:
        if not _GROUP.match(group):
            raise InvalidInputError(
                f"invalid group name {group!r}", hint="use letters, digits, '_', '.', ':' or '-'"
            )
    return chosen


def check_scopes(scopes: Iterable[str]) -> frozenset[str]:
    chosen = frozenset(scopes)
    families = {p.split(":", 1)[0] for p in ALL_PERMISSIONS}
    for scope in chosen:
        if scope == "*" or scope in ALL_PERMISSIONS:
            continue
        family, _, rest = scope.partition(":")
        if rest == "*" and family in families:
            continue
        raise InvalidInputError(
            f"unknown scope {scope!r}",
            hint=f"use '*', '<family>:*' or one of {', '.join(sorted(ALL_PERMISSIONS))}",
        )
    if not chosen:
        raise InvalidInputError("a token needs at least one scope", hint="use '*' for all the roles allow")
    return chosen


def _list(value: Iterable[str]) -> str:
    return json.dumps(sorted(value))


def _set(text: str) -> frozenset[str]:
    return frozenset(json.loads(text))


def _token_info(row: Any) -> TokenInfo:
    return TokenInfo(
        id=row.id,
        tenant=row.tenant,
        subject=row.subject,
        roles=tuple(sorted(_set(row.roles))),
        groups=tuple(sorted(_set(row.groups))),
        scopes=tuple(sorted(_set(row.scopes))),
        description=row.description,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )


class AuthService:
    """Users, tokens and sessions of every tenant; each lookup returns a tenant-bound `Principal`."""

    def __init__(
        self, store: SqlStore, *, clock: Callable[[], float] = time.time, scrypt_n: int = 2**14
    ) -> None:
        if scrypt_n < 2 or scrypt_n & (scrypt_n - 1):
            raise InvalidInputError("scrypt_n must be a power of two")
        self.store = store
        self.clock = clock
        self.scrypt_n = scrypt_n
        # in this process only: a brake on password guessing, not an account lock-out
        self._failures: dict[tuple[str, str], list[float]] = {}

    # -- tenants ------------------------------------------------------------

    async def ensure_tenant(self, name: str, display_name: str | None = None) -> None:
        check_tenant(name)
        now = self.clock()

        def fn(conn: Connection) -> None:
            _ensure_tenant(conn, name, display_name, now)

        await self.store.run(fn)

    async def list_tenants(self) -> list[str]:
        def fn(conn: Connection) -> list[str]:
            return list(conn.execute(sa.select(t.tenants.c.name).order_by(t.tenants.c.name)).scalars())

        return await self.store.run(fn)

    # -- users ----------------------------------------------------------------

    async def create_user(
        self,
        tenant: str,
        username: str,
        password: str,
        roles: Iterable[str],
        groups: Iterable[str] = (),
    ) -> Principal:
        check_tenant(tenant)
        if not isinstance(username, str) or not _USERNAME.match(username):
            raise InvalidInputError(
                f"invalid username {username!r}", hint="use letters, digits and '_.@+-' (at most 200)"
            )
        if len(password) < MIN_PASSWORD:
            raise InvalidInputError(f"password too short: use at least {MIN_PASSWORD} characters")
        chosen_roles, chosen_groups = check_roles(roles), check_groups(groups)
        encoded = await asyncio.to_thread(functools.partial(hash_password, password, n=self.scrypt_n))
        now = self.clock()

        def fn(conn: Connection) -> None:
            _ensure_tenant(conn, tenant, None, now)
            exists = conn.execute(
                sa.select(t.users.c.username).where(
                    t.users.c.tenant == tenant, t.users.c.username == username
                )
            ).first()
            if exists:
                raise ConflictError(f"user {username!r} already exists in tenant {tenant!r}")
            conn.execute(
                t.users.insert().values(
                    tenant=tenant,
                    username=username,
                    password_hash=encoded,
                    roles=_list(chosen_roles),
                    groups=_list(chosen_groups),
                    disabled=False,
                    created_at=now,
                )
            )

        await self.store.run(fn)
        return Principal(tenant=tenant, subject=username, roles=chosen_roles, groups=chosen_groups)

    async def list_users(self, tenant: str) -> list[UserInfo]:
        def fn(conn: Connection) -> list[UserInfo]:
            rows = conn.execute(
                sa.select(t.users).where(t.users.c.tenant == tenant).order_by(t.users.c.username)
            )
            return [
                UserInfo(
                    tenant=r.tenant,
                    username=r.username,
                    roles=tuple(sorted(_set(r.roles))),
                    groups=tuple(sorted(_set(r.groups))),
                    disabled=bool(r.disabled),
                    created_at=r.created_at,
                )
                for r in rows
            ]

        return await self.store.run(fn)

    async def user_principal(self, tenant: str, username: str) -> Principal:
        """The principal of an existing, enabled user (to issue a token from the CLI)."""

        def fn(conn: Connection) -> sa.Row[Any] | None:
            return conn.execute(
                sa.select(t.users).where(t.users.c.tenant == tenant, t.users.c.username == username)
            ).first()

        row = await self.store.run(fn)
        if row is None:
            raise NotFoundError(
                f"no user {username!r} in tenant {tenant!r}", hint="add one with: tower users add"
            )
        if row.disabled:
            raise InvalidInputError(f"user {username!r} is disabled")
        return Principal(tenant=tenant, subject=username, roles=_set(row.roles), groups=_set(row.groups))

    async def set_disabled(self, tenant: str, username: str, disabled: bool) -> None:
        """Disable (or re-enable) a user; disabling ends their sessions and stops their tokens."""

        def fn(conn: Connection) -> None:
            done = conn.execute(
                t.users.update()
                .where(t.users.c.tenant == tenant, t.users.c.username == username)
                .values(disabled=disabled)
            )
            if done.rowcount == 0:
                raise NotFoundError(f"no user {username!r} in tenant {tenant!r}")
            if disabled:
                conn.execute(
                    t.sessions.delete().where(t.sessions.c.tenant == tenant, t.sessions.c.subject == username)
                )

        await self.store.run(fn)

    async def login(self, tenant: str, username: str, password: str) -> Principal:
        key = (tenant, username)
        now = self.clock()
        recent = [t for t in self._failures.get(key, []) if t > now - FAILED_LOGIN_WINDOW]
        if len(recent) >= MAX_FAILED_LOGINS:
            wait = int(recent[0] + FAILED_LOGIN_WINDOW - now) + 1
            raise TooManyAttemptsError(f"too many failed logins; try again in {wait} s")
        try:
            principal = await self._login(tenant, username, password)
        except AuthError:
            if len(self._failures) > 100_000:  # bounded memory under a spray of usernames
                self._failures.clear()
            self._failures[key] = [*recent, now]
            raise
        self._failures.pop(key, None)
        return principal

    async def _login(self, tenant: str, username: str, password: str) -> Principal:
        def fn(conn: Connection) -> sa.Row[Any] | None:
            return conn.execute(
                sa.select(t.users).where(t.users.c.tenant == tenant, t.users.c.username == username)
            ).first()

        row = await self.store.run(fn) if _NAME.match(tenant or "") else None
        encoded = row.password_hash if row is not None else dummy_hash()
        ok = await asyncio.to_thread(verify_password, password, encoded)
        if row is None or not ok or row.disabled:
            raise AuthError("wrong tenant, username or password")
        return Principal(tenant=tenant, subject=username, roles=_set(row.roles), groups=_set(row.groups))

    # -- browser sessions -----------------------------------------------------

    async def create_session(self, principal: Principal, ttl_seconds: float = SESSION_TTL) -> str:
        sid = secrets.token_urlsafe(32)
        now = self.clock()

        def fn(conn: Connection) -> None:
            conn.execute(t.sessions.delete().where(t.sessions.c.expires_at <= now))
            conn.execute(
                t.sessions.insert().values(
                    id_hash=sha256(sid),
                    tenant=principal.tenant,
                    subject=principal.subject,
                    roles=_list(principal.roles),
                    groups=_list(principal.groups),
                    created_at=now,
                    expires_at=now + ttl_seconds,
                )
            )

        await self.store.run(fn)
        return sid

    async def session_principal(self, sid: str) -> Principal | None:
        if not sid or len(sid) > 200:
            return None
        now = self.clock()

        def fn(conn: Connection) -> sa.Row[Any] | None:
            return conn.execute(
                sa.select(t.sessions).where(
                    t.sessions.c.id_hash == sha256(sid), t.sessions.c.expires_at > now
                )
            ).first()

        row = await self.store.run(fn)
        if row is None:
            return None
        return Principal(
            tenant=row.tenant, subject=row.subject, roles=_set(row.roles), groups=_set(row.groups)
        )

    async def end_session(self, sid: str) -> None:
        def fn(conn: Connection) -> None:
            conn.execute(t.sessions.delete().where(t.sessions.c.id_hash == sha256(sid)))

        await self.store.run(fn)

    # -- API tokens -----------------------------------------------------------

    async def issue_token(
        self,
        principal: Principal,
        scopes: Iterable[str],
        ttl_seconds: float,
        *,
        description: str | None = None,
    ) -> str:
        """A new token acting as ``principal`` within ``scopes``; the only time it is ever shown."""
        token, _info = await self.issue_token_info(principal, scopes, ttl_seconds, description=description)
        return token

    async def issue_token_info(
        self,
        principal: Principal,
        scopes: Iterable[str],
        ttl_seconds: float,
        *,
        description: str | None = None,
    ) -> tuple[str, TokenInfo]:
        chosen = check_scopes(scopes)
        if principal.scopes is not None and "*" not in principal.scopes and not chosen <= principal.scopes:
            raise InvalidInputError("a token cannot have scopes its issuer does not have")
        if not 0 < ttl_seconds <= MAX_TOKEN_TTL:
            raise InvalidInputError(
                f"token lifetime {ttl_seconds} s is out of range", hint="use 1 s to 366 days"
            )
        check_tenant(principal.tenant)
        check_roles(principal.roles)
        token_id = new_id("tok")
        token = f"{token_id}.{secrets.token_urlsafe(32)}"
        now = self.clock()
        row = {
            "id": token_id,
            "token_hash": sha256(token),
            "tenant": principal.tenant,
            "subject": principal.subject,
            "roles": _list(principal.roles),
            "groups": _list(principal.groups),
            "scopes": _list(chosen),
            "description": (description or None) and description[:200],
            "created_at": now,
            "expires_at": now + ttl_seconds,
            "revoked_at": None,
            "last_used_at": None,
        }

        def fn(conn: Connection) -> None:
            _ensure_tenant(conn, principal.tenant, None, now)
            conn.execute(t.api_tokens.insert().values(**row))

        await self.store.run(fn)
        return token, _token_info(_RowView(row))

    async def verify_token(self, token: str) -> Principal:
        if not token or len(token) > 200:
            raise AuthError("invalid API token", hint="send 'Authorization: Bearer <token>'")
        now = self.clock()
        digest = sha256(token)

        def fn(conn: Connection) -> tuple[sa.Row[Any] | None, bool]:
            row = conn.execute(sa.select(t.api_tokens).where(t.api_tokens.c.token_hash == digest)).first()
            if row is None:
                return None, False
            disabled = conn.execute(
                sa.select(t.users.c.disabled).where(
                    t.users.c.tenant == row.tenant, t.users.c.username == row.subject
                )
            ).scalar_one_or_none()
            if (
                row.revoked_at is None
                and row.expires_at > now
                and (row.last_used_at is None or row.last_used_at < now - _TOUCH_EVERY)
            ):
                conn.execute(
                    t.api_tokens.update().where(t.api_tokens.c.id == row.id).values(last_used_at=now)
                )
            return row, bool(disabled)

        row, disabled = await self.store.run(fn)
        if row is None:
            raise AuthError("invalid API token", hint="issue a new token with 'tower tokens issue'")
        if row.revoked_at is not None:
            raise AuthError("this API token was revoked", hint="issue a new token")
        if row.expires_at <= now:
            raise AuthError("this API token has expired", hint="issue a new token")
        if disabled:
            raise AuthError("the user of this API token is disabled")
        return Principal(
            tenant=row.tenant,
            subject=row.subject,
            roles=_set(row.roles),
            groups=_set(row.groups),
            scopes=_set(row.scopes),
            token_id=row.id,
        )

    async def revoke_token(self, token_id: str, *, tenant: str | None = None) -> None:
        """Revoke a token by id (restricted to ``tenant`` when given); unknown ids raise NotFoundError."""
        now = self.clock()

        def fn(conn: Connection) -> int:
            cond = [t.api_tokens.c.id == token_id]
            if tenant is not None:
                cond.append(t.api_tokens.c.tenant == tenant)
            found = conn.execute(sa.select(t.api_tokens.c.revoked_at).where(*cond)).first()
            if found is None:
                return 0
            if found.revoked_at is None:
                conn.execute(t.api_tokens.update().where(*cond).values(revoked_at=now))
            return 1

        if not await self.store.run(fn):
            raise NotFoundError(f"no API token {token_id!r}")

    async def list_tokens(self, tenant: str | None = None) -> list[TokenInfo]:
        def fn(conn: Connection) -> list[TokenInfo]:
            query = sa.select(t.api_tokens).order_by(t.api_tokens.c.created_at)
            if tenant is not None:
                query = query.where(t.api_tokens.c.tenant == tenant)
            return [_token_info(r) for r in conn.execute(query)]

        return await self.store.run(fn)


class _RowView:
    """Attribute access over a dict, to build a TokenInfo from the row just inserted."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.__dict__.update(data)


def _ensure_tenant(conn: Connection, name: str, display_name: str | None, now: float) -> None:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    stmt = insert(t.tenants).values(name=name, display_name=display_name, created_at=now)
    conn.execute(stmt.on_conflict_do_nothing(index_elements=["name"]))
