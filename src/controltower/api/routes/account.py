"""Who am I, sessions, API tokens and users (tenant admins manage their own tenant only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field

from controltower.api.deps import SESSION_COOKIE, Services, current_principal, require, services
from controltower.api.pagination import MAX_LIMIT, Page, cursor_of, encode_cursor
from controltower.api.problems import PROBLEM_RESPONSES
from controltower.auth import ROLES, Principal
from controltower.auth.service import SESSION_TTL, TokenInfo, UserInfo
from controltower.spec.errors import InvalidInputError

router = APIRouter(prefix="/v1", tags=["account"], responses=PROBLEM_RESPONSES)

Svc = Annotated[Services, Depends(services)]


class Me(BaseModel):
    tenant: str
    subject: str
    roles: list[str]
    groups: list[str]
    scopes: list[str] | None
    permissions: list[str]


class LoginBody(BaseModel):
    tenant: str = Field(default="default", min_length=1, max_length=64)
    username: str = Field(min_length=1, max_length=200)
    password: str = Field(min_length=1, max_length=1024)


class TokenBody(BaseModel):
    scopes: list[str] = Field(default_factory=lambda: ["*"], min_length=1, max_length=50)
    ttl_seconds: float = Field(default=30 * 86400, gt=0, le=366 * 86400)
    description: str | None = Field(default=None, max_length=200)


class TokenOut(BaseModel):
    id: str
    subject: str
    roles: list[str]
    scopes: list[str]
    description: str | None
    created_at: float
    expires_at: float
    revoked_at: float | None
    last_used_at: float | None
    active: bool


class IssuedToken(TokenOut):
    token: str = Field(description="The secret; shown only in this response.")


class UserBody(BaseModel):
    username: str = Field(min_length=1, max_length=200)
    password: str = Field(min_length=8, max_length=1024)
    roles: list[str] = Field(min_length=1, max_length=4)
    groups: list[str] = Field(default_factory=list, max_length=50)


class UserOut(BaseModel):
    username: str
    roles: list[str]
    groups: list[str]
    disabled: bool
    created_at: float


def _me(p: Principal) -> Me:
    return Me(
        tenant=p.tenant,
        subject=p.subject,
        roles=sorted(p.roles),
        groups=sorted(p.groups),
        scopes=None if p.scopes is None else sorted(p.scopes),
        permissions=sorted(p.permissions),
    )


def _token(info: TokenInfo) -> TokenOut:
    return TokenOut(
        id=info.id,
        subject=info.subject,
        roles=list(info.roles),
        scopes=list(info.scopes),
        description=info.description,
        created_at=info.created_at,
        expires_at=info.expires_at,
        revoked_at=info.revoked_at,
        last_used_at=info.last_used_at,
        active=info.active,
    )


def _user(info: UserInfo) -> UserOut:
    return UserOut(
        username=info.username,
        roles=list(info.roles),
        groups=list(info.groups),
        disabled=info.disabled,
        created_at=info.created_at,
    )


@router.get("/me", summary="The authenticated caller")
async def me(principal: Annotated[Principal, Depends(current_principal)]) -> Me:
    return _me(principal)


@router.post("/auth/login", summary="Log in with a password; sets the session cookie")
async def login(body: LoginBody, request: Request, response: Response, svc: Svc) -> Me:
    principal = await svc.auth.login(body.tenant, body.username, body.password)
    sid = await svc.auth.create_session(principal)
    response.set_cookie(
        SESSION_COOKIE,
        sid,
        max_age=int(SESSION_TTL),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return _me(principal)


@router.post("/auth/logout", status_code=204, summary="End the browser session")
async def logout(request: Request, response: Response, svc: Svc) -> None:
    sid = request.cookies.get(SESSION_COOKIE)
    if sid:
        await svc.auth.end_session(sid)
    response.delete_cookie(SESSION_COOKIE, path="/")


@router.post("/tokens", status_code=201, summary="Issue an API token acting as the caller")
async def issue_token(
    body: TokenBody, svc: Svc, principal: Annotated[Principal, Depends(current_principal)]
) -> IssuedToken:
    if principal.token_id is not None and not principal.can("tokens:manage"):
        raise InvalidInputError(
            "a token cannot issue tokens", hint="log in, or use a token of an admin with scope tokens:manage"
        )
    token, info = await svc.auth.issue_token_info(
        principal, body.scopes, body.ttl_seconds, description=body.description
    )
    return IssuedToken(token=token, **_token(info).model_dump())


@router.get("/tokens", summary="API tokens of the caller (admins: of the whole tenant)")
async def list_tokens(
    svc: Svc,
    principal: Annotated[Principal, Depends(current_principal)],
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: str | None = None,
) -> Page[TokenOut]:
    after = cursor_of(cursor, str)
    tokens = await svc.auth.list_tokens(principal.tenant)
    if not principal.can("tokens:manage"):
        tokens = [x for x in tokens if x.subject == principal.subject]
    tokens.sort(key=lambda x: x.id)
    if after is not None:
        tokens = [x for x in tokens if x.id > after]
    page = tokens[:limit]
    nxt = encode_cursor(page[-1].id) if len(tokens) > limit else None
    return Page[TokenOut](items=[_token(x) for x in page], next_cursor=nxt)


@router.delete("/tokens/{token_id}", status_code=204, summary="Revoke an API token")
async def revoke_token(
    token_id: str, svc: Svc, principal: Annotated[Principal, Depends(current_principal)]
) -> None:
    if not principal.can("tokens:manage"):
        mine = {x.id for x in await svc.auth.list_tokens(principal.tenant) if x.subject == principal.subject}
        if token_id not in mine:
            from controltower.spec.errors import NotFoundError

            raise NotFoundError(f"no API token {token_id!r}")
    await svc.auth.revoke_token(token_id, tenant=principal.tenant)


@router.get("/users", summary="Users of the caller's tenant")
async def list_users(
    svc: Svc,
    principal: Annotated[Principal, Depends(require("users:manage"))],
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: str | None = None,
) -> Page[UserOut]:
    after = cursor_of(cursor, str)
    users = [u for u in await svc.auth.list_users(principal.tenant) if after is None or u.username > after]
    page = users[:limit]
    nxt = encode_cursor(page[-1].username) if len(users) > limit else None
    return Page[UserOut](items=[_user(u) for u in page], next_cursor=nxt)


@router.post("/users", status_code=201, summary="Add a user to the caller's tenant")
async def add_user(
    body: UserBody, svc: Svc, principal: Annotated[Principal, Depends(require("users:manage"))]
) -> UserOut:
    unknown = sorted(set(body.roles) - set(ROLES))
    if unknown:
        raise InvalidInputError(f"unknown role(s) {', '.join(unknown)}", hint=f"roles are {', '.join(ROLES)}")
    await svc.auth.create_user(principal.tenant, body.username, body.password, body.roles, body.groups)
    users = {u.username: u for u in await svc.auth.list_users(principal.tenant)}
    return _user(users[body.username])


@router.post("/users/{username}/disable", status_code=204, summary="Disable a user (ends their sessions)")
async def disable_user(
    username: str, svc: Svc, principal: Annotated[Principal, Depends(require("users:manage"))]
) -> None:
    await svc.auth.set_disabled(principal.tenant, username, True)
