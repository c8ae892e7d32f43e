"""AuthService on both backends: secrets are never stored, lifetimes and revocation hold."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from controltower.auth import AuthError, AuthService, Principal
from controltower.auth.passwords import hash_password, verify_password
from controltower.spec.errors import ConflictError, InvalidInputError, NotFoundError
from controltower.store import SqlStore
from controltower.store import tables as t


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_password_hashes_carry_their_cost_and_verify() -> None:
    encoded = hash_password("s3cret words", n=2**10)
    assert encoded.startswith("scrypt$1024$8$1$")
    assert verify_password("s3cret words", encoded)
    assert not verify_password("s3cret wordz", encoded)
    assert not verify_password("s3cret words", "garbage")
    assert hash_password("same", n=2**8) != hash_password("same", n=2**8)  # salted


async def test_tokens_and_sessions(store: SqlStore) -> None:
    clock = Clock()
    auth = AuthService(store, clock=clock, scrypt_n=2**8)
    ada = await auth.create_user("acme", "ada", "long password", ["operator"], ["finance"])
    assert ada == Principal("acme", "ada", frozenset({"operator"}), frozenset({"finance"}))
    with pytest.raises(ConflictError):
        await auth.create_user("acme", "ada", "long password", ["viewer"])
    with pytest.raises(InvalidInputError):
        await auth.create_user("acme", "bob", "short", ["viewer"])
    with pytest.raises(InvalidInputError):
        await auth.create_user("acme", "bob", "long password", ["root"])
    with pytest.raises(InvalidInputError):
        await auth.create_user("Not A Tenant!", "bob", "long password", ["viewer"])
    assert "acme" in await auth.list_tenants()

    with pytest.raises(AuthError):
        await auth.login("acme", "ada", "wrong password")
    with pytest.raises(AuthError):
        await auth.login("other", "ada", "long password")
    assert (await auth.login("acme", "ada", "long password")).subject == "ada"

    token = await auth.issue_token(ada, ["runs:*"], 60)
    got = await auth.verify_token(token)
    assert (got.tenant, got.subject, got.scopes) == ("acme", "ada", frozenset({"runs:*"}))
    assert got.can("runs:start")
    assert not got.can("specs:publish")  # the role allows it, the scope does not
    sid = await auth.create_session(ada, ttl_seconds=30)
    assert await auth.session_principal(sid) == ada

    def stored(conn: sa.Connection) -> str:
        rows = [*conn.execute(sa.select(t.api_tokens)), *conn.execute(sa.select(t.sessions))]
        users = list(conn.execute(sa.select(t.users)))
        return repr(rows) + repr(users)

    dump = await store.run(stored)
    assert token.split(".", 1)[1] not in dump
    assert sid not in dump
    assert "long password" not in dump

    clock.now += 31
    assert await auth.session_principal(sid) is None
    clock.now += 30
    with pytest.raises(AuthError, match="expired"):
        await auth.verify_token(token)

    fresh = await auth.issue_token(ada, ["*"], 60)
    info = (await auth.list_tokens("acme"))[-1]
    await auth.revoke_token(info.id)
    with pytest.raises(AuthError, match="revoked"):
        await auth.verify_token(fresh)
    with pytest.raises(NotFoundError):
        await auth.revoke_token(info.id, tenant="globex")
    with pytest.raises(NotFoundError):
        await auth.revoke_token("tok_missing")

    third = await auth.issue_token(ada, ["*"], 60)
    sid = await auth.create_session(ada)
    await auth.set_disabled("acme", "ada", True)
    with pytest.raises(AuthError, match="disabled"):
        await auth.verify_token(third)
    assert await auth.session_principal(sid) is None
    with pytest.raises(AuthError):
        await auth.login("acme", "ada", "long password")
    with pytest.raises(InvalidInputError):
        await auth.issue_token(ada, ["*"], 10 * 366 * 86400)
