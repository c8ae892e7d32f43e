"""Hierarchical budgets: every charged call reserves on its run, workflow, department and tenant.

Why reservations: a call's price is known (or estimated) before it runs and charged after,
and calls run at once. Reserving first makes caps exact: ``used + reserved`` never passes a
cap, however many coroutines or processes race. Units are integers: ``micros`` (micro-units
of the currency) and ``tokens``.

How it stays exact:

- :meth:`BudgetLedger.reserve` charges every scope with ONE conditional ``UPDATE ... SET
  reserved = reserved + :n WHERE ... AND used + reserved + :n <= cap RETURNING scope``. If a
  scope refuses, the job undoes exactly what it charged (those rows stay locked by its own
  transaction) and returns the error as a value: nothing is charged anywhere, and the other
  jobs of the group-committed batch are not rolled back and re-run.
- The reservation row's primary key is the caller's key (run, step, call): reserving the
  same key again (a retry, a replay after a crash, a racing process) returns the existing
  reservation instead of charging twice.
- On PostgreSQL every transaction that changes a tenant's budgets first takes a per-tenant
  advisory transaction lock. All budget rows of a tenant are therefore changed by one
  transaction at a time, which also rules out lock-order deadlocks between group-committed
  batches; the rare remaining deadlock (batches spanning several tenants) is retried.

Crashed processes leave reservations behind; :meth:`BudgetLedger.expire_stale` returns them.
The engine should call it from its maintenance loop (say once a minute) with ``older_than``
longer than the longest a call may legitimately hold a reservation — the tool timeout, and
the approval wait when the reservation is taken before the approval. Expiring a live call's
reservation is not a loss: its later :meth:`~BudgetLedger.commit` still charges the actual
amount (as overspend if the cap was used meanwhile), it only loosens the cap in between.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from controltower.gateway.ratelimit import BUDGET_LOCK_CLASS, run_retrying
from controltower.spec.errors import ConflictError, InvalidInputError, NotFoundError, TowerError
from controltower.spec.models import BudgetSpec
from controltower.store import SqlStore
from controltower.store import tables as t
from controltower.store.sql import RawSql

UNITS: tuple[str, ...] = ("micros", "tokens")
ALLOTMENT_PREFIX = "allot:"  # reservation keys of allotments (see controltower.gateway.allotments)
_AFTER_ALLOTMENTS = "allot;"  # the first key after every key that starts with ALLOTMENT_PREFIX
_SCOPE = re.compile(r"^(tenant|department|workflow|run):\S.{0,290}$")


def budget_scopes(
    tenant: str, *, department: str | None = None, workflow: str | None = None, run: str | None = None
) -> list[str]:
    """The scope strings of one call, narrowest first: run, workflow, department, tenant."""
    scopes = [f"run:{run}"] if run else []
    if workflow:
        scopes.append(f"workflow:{workflow}")
    if department:
        scopes.append(f"department:{department}")
    scopes.append(f"tenant:{tenant}")
    return scopes


class BudgetExceeded(TowerError):
    """A reservation would take a capped budget over its cap; nothing was charged anywhere."""

    code = "budget_exceeded"

    def __init__(
        self, *, tenant: str, scope: str, unit: str, cap: int, used: int, reserved: int, requested: int
    ) -> None:
        self.tenant, self.scope, self.unit = tenant, scope, unit
        self.cap, self.used, self.reserved, self.requested = cap, used, reserved, requested
        self.over = used + reserved + requested - cap
        super().__init__(
            f"budget {scope} ({unit}) of tenant {tenant!r} would be exceeded by {self.over} {unit}: "
            f"cap {cap}, used {used}, reserved by calls in flight {reserved}, requested {requested}",
            hint=f"raise the {unit} cap of {scope}, wait for calls in flight to finish, or ask for less",
        )


@dataclass(frozen=True, slots=True)
class Reservation:
    """One call's claim on its budgets. ``status``: reserved | committed | released."""

    key: str
    tenant: str
    scopes: tuple[str, ...]
    unit: str
    amount: int
    status: str
    actual: int | None
    created_at: float
    settled_at: float | None
    replayed: bool = False  # an existing reservation returned as is: this call charged or settled nothing

    @property
    def charged(self) -> int:
        """What the budgets hold for this call now: the reserve, the actual amount, or nothing."""
        held = {"reserved": self.amount, "committed": self.actual or 0}
        return held.get(self.status, 0)

    @property
    def overspend(self) -> int:
        """How much more than reserved was charged at commit (not checked against the caps)."""
        return max(0, (self.actual or 0) - self.amount) if self.status == "committed" else 0


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    """One budget's state; ``remaining`` is None without a cap, never negative (overspend is in used)."""

    cap: int | None
    used: int
    reserved: int
    remaining: int | None
    scope: str = ""
    unit: str = ""


def _usage(cap: int | None, used: int, reserved: int, scope: str, unit: str) -> BudgetUsage:
    remaining = None if cap is None else max(0, cap - used - reserved)
    return BudgetUsage(cap, used, reserved, remaining, scope, unit)


class BudgetLedger:
    """Caps, reservations and usage per (tenant, scope, unit), kept in the store."""

    def __init__(self, store: SqlStore, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._pg = store.dialect == "postgresql"
        self._insert: Callable[[sa.Table], Any] = store.insert

    @property
    def store(self) -> SqlStore:
        return self._store

    # -- caps and usage ------------------------------------------------------

    async def set_cap(self, tenant: str, scope: str, unit: str, cap: int | None) -> None:
        """Set (or with ``None`` remove) the cap of one budget; usage is kept.

        A cap below what is already used or reserved is allowed: it refuses new reservations.
        """
        _check_budget(tenant, scope, unit)
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            raise InvalidInputError(f"budget cap must be a whole number >= 0 or None, got {cap!r}")

        def fn(conn: Connection) -> None:
            self._lock(conn, tenant)
            stmt = self._insert(t.budgets).values(
                tenant=tenant, scope=scope, unit=unit, cap=cap, used=0, reserved=0, updated_at=self._clock()
            )
            excluded = stmt.excluded
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["tenant", "scope", "unit"],
                    set_={"cap": excluded.cap, "updated_at": excluded.updated_at},
                )
            )

        await run_retrying(self._store, fn)

    async def usage(self, tenant: str, scope: str, unit: str) -> BudgetUsage:
        """Cap, used, reserved and remaining of one budget (zeros when never charged)."""

        def fn(conn: Connection) -> BudgetUsage:
            row = conn.execute(
                sa.select(t.budgets.c.cap, t.budgets.c.used, t.budgets.c.reserved).where(
                    t.budgets.c.tenant == tenant, t.budgets.c.scope == scope, t.budgets.c.unit == unit
                )
            ).first()
            if row is None:
                return _usage(None, 0, 0, scope, unit)
            return _usage(row.cap, int(row.used), int(row.reserved), scope, unit)

        return await self._store.run(fn)

    async def usages(self, tenant: str) -> list[BudgetUsage]:
        """Every budget of a tenant, ordered by scope and unit."""

        def fn(conn: Connection) -> list[BudgetUsage]:
            b = t.budgets.c
            rows = conn.execute(
                sa.select(b.scope, b.unit, b.cap, b.used, b.reserved)
                .where(b.tenant == tenant)
                .order_by(b.scope, b.unit)
            )
            return [_usage(r.cap, int(r.used), int(r.reserved), r.scope, r.unit) for r in rows]

        return await self._store.run(fn)

    async def reservation(self, key: str) -> Reservation | None:
        return await self._store.run(lambda conn: _load(conn, key))

    # -- reserve / commit / release -----------------------------------------

    async def reserve(
        self, key: str, tenant: str, scopes: Sequence[str], unit: str, amount: int
    ) -> Reservation:
        """Reserve ``amount`` on every scope, atomically, or raise :class:`BudgetExceeded`.

        Idempotent by ``key``: if the key is already reserved or settled, that reservation is
        returned (``replayed=True``) and nothing is charged. A released key is reserved again.
        Scopes without a budget row are created as track-only (no cap).
        """
        wanted = self.check_reservation(key, tenant, scopes, unit, amount)

        def fn(conn: Connection) -> Reservation | BudgetExceeded:
            return self.reserve_in(conn, key, tenant, wanted, unit, amount)

        result = await run_retrying(self._store, fn)
        if isinstance(result, BudgetExceeded):
            raise result
        return result

    def check_reservation(
        self, key: str, tenant: str, scopes: Sequence[str], unit: str, amount: int
    ) -> list[str]:
        """Validate a reservation's arguments (off the store thread); the scopes, deduplicated."""
        wanted = _scopes(tenant, scopes, unit)
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise InvalidInputError(f"budget amount must be a whole number >= 0, got {amount!r}")
        if not key or len(key) > 600:
            raise InvalidInputError("reservation key must be 1 to 600 characters (run, step and call)")
        return wanted

    def reserve_in(
        self, conn: Connection, key: str, tenant: str, wanted: list[str], unit: str, amount: int
    ) -> Reservation | BudgetExceeded:
        """:meth:`reserve` inside the caller's transaction, with scopes from :meth:`check_reservation`.

        Returns :class:`BudgetExceeded` instead of raising it, having undone its own charges, so
        the caller's other writes in the transaction still commit.
        """
        order = sorted(set(wanted))  # the same lock order for every transaction
        params: dict[str, Any] = {"t": tenant, "u": unit, "n": amount}
        params.update(_scope_params(order))
        now = self._clock()
        self._lock(conn, tenant)
        fresh = Reservation(key, tenant, tuple(wanted), unit, amount, "reserved", None, now, None)
        for _ in range(2):
            previous = None
            claimed = _CLAIM(conn, _row(fresh))
            inserted = claimed.fetchone() is not None
            claimed.close()
            if not inserted:  # the key exists
                previous = _load(conn, key)
                if previous is None:
                    raise ConflictError(f"reservation {key!r} was purged concurrently", hint="retry")
                _same(previous, tenant, unit, wanted)
                if previous.status != "released":
                    return replace(previous, replayed=True)
                if conn.execute(_REWRITE, _rewrite("released", fresh)).rowcount != 1:
                    raise ConflictError(f"reservation {key!r} changed concurrently", hint="retry")
            cursor = _charge(len(order))(conn, {**params, "now": now})
            charged = [row[0] for row in cursor.fetchall()]
            cursor.close()
            if len(charged) == len(order):
                return fresh
            # undo this attempt exactly: the rows stay locked by this transaction
            undo = {"t": tenant, "u": unit, "scopes": charged, "n": amount, "now": now}
            if charged:
                conn.execute(_UNCHARGE, undo)
            if previous is None:
                conn.execute(_DELETE_RES, {"b_key": key})
            else:
                conn.execute(_REWRITE, _rewrite("reserved", previous))
            exceeded, missing = _diagnose(conn, tenant, unit, wanted, amount)
            if exceeded is not None:
                return exceeded
            self._add_rows(conn, tenant, unit, missing, now)  # track-only; then again
        raise ConflictError("budgets changed while reserving", hint="retry the reservation")

    def settled_now(self, key: str) -> bool | None:
        """Whether :meth:`commit` of ``key`` would change nothing (committed, or no reservation),
        read on this thread (SQLite, see ``SqlStore.read_now``); None: ask the store thread."""

        def fn(db: Any) -> bool:
            cursor = db.execute(_RES_STATUS.text, {"key": key})
            try:
                row = cursor.fetchone()
            finally:
                cursor.close()
            return row is None or row[0] == "committed"

        found = self._store.read_now(fn)
        return None if found is None else found[0]

    def commit_in(self, conn: Connection, key: str, actual: int) -> Reservation | NotFoundError:
        """:meth:`commit` inside the caller's transaction (e.g. with the call's result and audit)."""
        for _ in range(3):
            for old in ("reserved", "released"):
                res = self._transition(conn, key, old, "committed", actual)
                if res is not None:
                    self._move(conn, res, res.amount if old == "reserved" else 0, actual)
                    return res
            res = _load(conn, key)
            if res is None:
                return NotFoundError(
                    f"no budget reservation with key {key!r}", hint="reserve before committing"
                )
            if res.status == "committed":
                return replace(res, replayed=True)
        raise ConflictError(f"reservation {key!r} keeps changing concurrently", hint="retry")

    async def commit(self, key: str, actual: int) -> Reservation:
        """Settle a reservation at the ``actual`` amount and return the rest; idempotent.

        ``actual`` may exceed the reservation: the call has happened, so the whole amount is
        charged even past a cap (see :attr:`Reservation.overspend`); the next reservation then
        fails. Committing a reservation that was released (e.g. expired while the call ran)
        charges ``actual`` too. A second commit changes nothing and returns the first result.
        """
        if isinstance(actual, bool) or not isinstance(actual, int) or actual < 0:
            raise InvalidInputError(f"actual budget amount must be a whole number >= 0, got {actual!r}")

        def fn(conn: Connection) -> Reservation | NotFoundError:
            return self.commit_in(conn, key, actual)

        result = await run_retrying(self._store, fn)
        if isinstance(result, NotFoundError):
            raise result
        return result

    async def release(self, key: str) -> Reservation | None:
        """Give a reservation back (the call did not happen); idempotent.

        Releasing a committed or released reservation changes nothing; an unknown key
        (the reservation never happened) returns None.
        """

        return await run_retrying(self._store, lambda conn: self.release_in(conn, key))

    def release_in(self, conn: Connection, key: str) -> Reservation | None:
        """:meth:`release` inside the caller's transaction."""
        res = self._transition(conn, key, "reserved", "released", None)
        if res is not None:
            self._move(conn, res, res.amount, 0)
            return res
        res = _load(conn, key)
        return None if res is None else replace(res, replayed=True)

    async def expire_stale(self, older_than: float, *, limit: int = 1000) -> int:
        """Release reservations still open ``older_than`` seconds after they were made.

        For reservations left by crashed processes; returns how many were released, at most
        ``limit`` (oldest first: call again while it returns ``limit``). See the module
        docstring for how often and with what age to call it.
        """
        if older_than < 0:
            raise InvalidInputError("older_than must be >= 0 seconds")

        def fn(conn: Connection) -> int:
            r = t.budget_reservations.c
            cutoff = self._clock() - older_than
            rows = conn.execute(
                sa.select(r.key, r.tenant)
                .where(r.status == "reserved", r.created_at < cutoff)
                .order_by(r.created_at)
                .limit(limit)
            ).all()
            for tenant in sorted({row.tenant for row in rows}):
                self._lock(conn, tenant)
            released = 0
            for row in rows:  # guarded by status and age: either may have changed since the select
                res = self._transition(conn, row.key, "reserved", "released", None, cutoff=cutoff)
                if res is not None:
                    self._move(conn, res, res.amount, 0)
                    released += 1
            return released

        return await run_retrying(self._store, fn)

    async def purge_settled(self, older_than: float) -> int:
        """Delete committed and released reservations settled ``older_than`` seconds ago.

        Keeps the reservation table small. A key purged this way is no longer idempotent:
        reserving it again charges again, so keep ``older_than`` beyond any replay window.
        """

        def fn(conn: Connection) -> int:
            r = t.budget_reservations.c
            stmt = t.budget_reservations.delete().where(
                r.status.in_(("committed", "released")), r.settled_at < self._clock() - older_than
            )
            return int(conn.execute(stmt).rowcount)

        return await self._store.run(fn)

    # -- allotments: a process's share of the budgets, spent call by call in memory -----

    def headroom_in(self, conn: Connection, tenant: str, scopes: Sequence[str], unit: str) -> int | None:
        """The least ``cap - used - reserved`` over the capped budgets of ``scopes``; None: none capped."""
        order = sorted(set(scopes))
        cursor = _headroom(len(order))(conn, {"t": tenant, "u": unit, **_scope_params(order)})
        try:
            row = cursor.fetchone()
        finally:
            cursor.close()
        return None if row is None or row[0] is None else int(row[0])

    def draw_in(
        self, conn: Connection, allotment: str, key: str, tenant: str, scopes: Sequence[str], amount: int
    ) -> bool:
        """Charge one call of ``amount`` drawn from the allotment reserved under key ``allotment``.

        In the caller's transaction (the call's result and audit record): the call gets a
        committed reservation row of its own under ``key`` (so a replay never charges it again),
        the allotment's row gives up ``amount``, and every scope moves ``amount`` from reserved
        to used. If the allotment was already given back (expired while the call ran), the
        amount is only added to used, like a commit of an expired reservation. False: ``key``
        was already charged (a replay), nothing changed.
        """
        now = self._clock()
        row = {
            "key": key,
            "tenant": tenant,
            "scopes": json.dumps(list(scopes)),
            "unit": "micros",
            "amount": amount,
            "actual": amount,
            "status": "committed",
            "created_at": now,
            "settled_at": now,
        }
        cursor = _CLAIM_SETTLED(conn, row)
        inserted = cursor.fetchone() is not None
        cursor.close()
        if not inserted:
            return False
        cursor = _DRAW(conn, {"b_key": allotment, "n": amount})
        held = amount if cursor.rowcount == 1 else 0
        cursor.close()
        order = sorted(set(scopes))
        values: dict[str, Any] = {"t": tenant, "u": "micros", "held": held, "charge": amount, "now": now}
        cursor = _settle(len(order))(conn, {**values, **_scope_params(order)})
        changed = cursor.rowcount
        cursor.close()
        if changed != len(order):
            raise ConflictError(
                f"budget rows of allotment {allotment!r} are missing ({changed} of {len(order)} found)",
                hint="do not delete budget rows that have open reservations",
            )
        return True

    def shrink_in(
        self, conn: Connection, allotment: str, tenant: str, scopes: Sequence[str], amount: int
    ) -> int:
        """Give back ``amount`` of an allotment that calls still draw from (its unspent part);
        returns what was given back (0 if the allotment was already released)."""
        cursor = _DRAW(conn, {"b_key": allotment, "n": amount})
        held = amount if cursor.rowcount == 1 else 0
        cursor.close()
        if held:
            order = sorted(set(scopes))
            values: dict[str, Any] = {"t": tenant, "u": "micros", "held": held, "charge": 0}
            _settle(len(order))(conn, {**values, **_scope_params(order), "now": self._clock()}).close()
        return held

    def expire_allotments_in(self, conn: Connection, older_than: float, *, limit: int = 100) -> int:
        """Give back allotments still open ``older_than`` seconds after they were made: those of
        a process that died (a live one gives its own back within seconds). Returns how many."""
        r = t.budget_reservations.c
        cutoff = self._clock() - older_than
        rows = conn.execute(
            sa.select(r.key)
            .where(r.key >= ALLOTMENT_PREFIX, r.key < _AFTER_ALLOTMENTS)  # a range of the primary key
            .where(r.status == "reserved", r.created_at < cutoff)
            .order_by(r.created_at)
            .limit(limit)
        ).all()
        released = 0
        for row in rows:
            res = self._transition(conn, row.key, "reserved", "released", None, cutoff=cutoff)
            if res is not None:
                self._move(conn, res, res.amount, 0)
                released += 1
        return released

    # -- inside the transaction ----------------------------------------------

    def lock_in(self, conn: Connection, tenant: str) -> None:
        """Take the tenant's budget lock now (PostgreSQL; a no-op on SQLite, whose writers are
        serialised). A transaction that also locks other rows (a tool call's) takes this first,
        so that every such transaction locks in the same order: budgets, then the rows."""
        self._lock(conn, tenant)

    def _lock(self, conn: Connection, tenant: str) -> None:
        if self._pg:
            _PG_TENANT_LOCK(conn, {"cls": BUDGET_LOCK_CLASS, "key": tenant}).close()

    def _transition(
        self,
        conn: Connection,
        key: str,
        old: str,
        new: str,
        actual: int | None,
        *,
        cutoff: float | None = None,
    ) -> Reservation | None:
        """Move a reservation from status ``old`` to ``new`` with one guarded UPDATE, then lock
        its tenant; None if it is not in status ``old`` (or not made before ``cutoff``)."""
        values = {"b_key": key, "old": old, "b_status": new, "b_actual": actual, "now": self._clock()}
        if cutoff is None:
            cursor = _TRANSITION_RAW(conn, values)
            found = cursor.fetchone()
            cursor.close()
            if found is None:
                return None
            res = _reservation_from(found)
        else:
            row = conn.execute(_EXPIRE, {**values, "cutoff": cutoff}).first()
            if row is None:
                return None
            res = _reservation(row)
        self._lock(conn, res.tenant)
        return res

    def _move(self, conn: Connection, res: Reservation, held: int, charge: int | None) -> None:
        """Take ``held`` off ``reserved``, add ``charge`` to ``used``, on every scope."""
        scopes = sorted(set(res.scopes))
        values: dict[str, Any] = {"t": res.tenant, "u": res.unit, "held": held, "charge": charge or 0}
        values.update(_scope_params(scopes), now=self._clock())
        cursor = _settle(len(scopes))(conn, values)
        changed = cursor.rowcount
        cursor.close()
        if changed != len(scopes):  # budget rows deleted by hand: refuse rather than lose money
            raise ConflictError(
                f"budget rows of reservation {res.key!r} are missing ({changed} of {len(scopes)} found)",
                hint="do not delete budget rows that have open reservations",
            )

    def _add_rows(self, conn: Connection, tenant: str, unit: str, scopes: list[str], now: float) -> None:
        base = {"tenant": tenant, "unit": unit, "cap": None, "used": 0, "reserved": 0, "updated_at": now}
        conn.execute(self._insert(t.budgets).on_conflict_do_nothing(), [{**base, "scope": s} for s in scopes])


# -- helpers -----------------------------------------------------------------


def _check_budget(tenant: str, scope: str, unit: str) -> None:
    if not tenant or len(tenant) > 64:
        raise InvalidInputError(f"tenant must be 1 to 64 characters, got {tenant!r}")
    if not _SCOPE.match(scope):
        raise InvalidInputError(
            f"invalid budget scope {scope!r}",
            hint="use tenant:<t>, department:<d>, workflow:<w> or run:<id> (at most 300 characters)",
        )
    if unit not in UNITS:
        raise InvalidInputError(f"budget unit must be one of {', '.join(UNITS)}, got {unit!r}")


def _scopes(tenant: str, scopes: Sequence[str], unit: str) -> list[str]:
    if isinstance(scopes, str):
        raise InvalidInputError("scopes must be a list of scope strings, not one string")
    wanted = list(dict.fromkeys(scopes))
    if not wanted:
        raise InvalidInputError("a reservation needs at least one scope", hint="e.g. ['tenant:acme']")
    for scope in wanted:
        _check_budget(tenant, scope, unit)
    return wanted


def _reservation_from(row: Sequence[Any]) -> Reservation:
    key, tenant, scopes, unit, amount, actual, status, created_at, settled_at = row
    actual = None if actual is None else int(actual)
    return Reservation(
        key, tenant, tuple(json.loads(scopes)), unit, int(amount), status, actual, created_at, settled_at
    )


def _load(conn: Connection, key: str) -> Reservation | None:
    row = conn.execute(_SELECT_RES, {"key": key}).first()
    return None if row is None else _reservation(row)


def _row(r: Reservation) -> dict[str, Any]:
    row = dict(
        key=r.key, tenant=r.tenant, unit=r.unit, amount=r.amount, status=r.status, created_at=r.created_at
    )
    return {**row, "scopes": json.dumps(list(r.scopes))}


def _rewrite(old: str, r: Reservation) -> dict[str, Any]:
    """Parameters of ``_REWRITE``: from status ``old`` to exactly ``r``."""
    names = ("b_key", "b_amount", "b_status", "b_actual", "b_created_at", "b_settled_at")
    values = (r.key, r.amount, r.status, r.actual, r.created_at, r.settled_at)
    return {"old": old, **dict(zip(names, values, strict=True))}


def _reservation(row: sa.Row[Any]) -> Reservation:
    actual = None if row.actual is None else int(row.actual)
    scopes, amount = tuple(json.loads(row.scopes)), int(row.amount)
    return Reservation(
        row.key, row.tenant, scopes, row.unit, amount, row.status, actual, row.created_at, row.settled_at
    )


def _same(res: Reservation, tenant: str, unit: str, scopes: list[str]) -> None:
    if res.tenant != tenant or res.unit != unit or sorted(res.scopes) != sorted(scopes):
        raise ConflictError(
            f"reservation key {res.key!r} is already used for tenant {res.tenant!r}, unit {res.unit}, "
            f"scopes {list(res.scopes)}",
            hint="use one key per call (run, step, call) and the same scopes when replaying it",
        )


def _diagnose(
    conn: Connection, tenant: str, unit: str, scopes: list[str], amount: int
) -> tuple[BudgetExceeded | None, list[str]]:
    """Why a charge failed: the first capped scope it would exceed, else the missing rows."""
    b = t.budgets.c
    query = sa.select(b.scope, b.cap, b.used, b.reserved)
    query = query.where(b.tenant == tenant, b.unit == unit, b.scope.in_(scopes)).with_for_update()
    found = {row.scope: row for row in conn.execute(query)}
    for scope in scopes:  # the caller's order: narrowest first
        row = found.get(scope)
        if row is not None and row.cap is not None and row.used + row.reserved + amount > row.cap:
            used, reserved = int(row.used), int(row.reserved)
            return BudgetExceeded(
                tenant=tenant,
                scope=scope,
                unit=unit,
                cap=int(row.cap),
                used=used,
                reserved=reserved,
                requested=amount,
            ), []
    return None, sorted(set(scopes) - set(found))


# Statements built once: building costs more than running them on SQLite.
_B = t.budgets.c
_R = t.budget_reservations.c
_SCOPES: sa.BindParameter[Any] = sa.bindparam("scopes", expanding=True)
_N = sa.bindparam("n", type_=sa.BigInteger)
_WHERE_SCOPES = (_B.tenant == sa.bindparam("t"), _B.unit == sa.bindparam("u"), _B.scope.in_(_SCOPES))
_UNCHARGE = t.budgets.update().where(*_WHERE_SCOPES).values(reserved=_B.reserved - _N)
_SELECT_RES = sa.select(t.budget_reservations).where(_R.key == sa.bindparam("key"))
_DELETE_RES = t.budget_reservations.delete().where(_R.key == sa.bindparam("b_key"))
_REWRITE = (  # re-reserve a released key, or undo that when the charge fails
    t.budget_reservations.update()
    .where(_R.key == sa.bindparam("b_key"), _R.status == sa.bindparam("old"))
    .values({c: sa.bindparam(f"b_{c}") for c in ("amount", "status", "actual", "created_at", "settled_at")})
)
_TRANSITION = (
    t.budget_reservations.update()
    .where(_R.key == sa.bindparam("b_key"), _R.status == sa.bindparam("old"))
    .values(status=sa.bindparam("b_status"), actual=sa.bindparam("b_actual"), settled_at=sa.bindparam("now"))
    .returning(*t.budget_reservations.c)
)
_EXPIRE = _TRANSITION.where(_R.created_at < sa.bindparam("cutoff"))


# the per-call statements, on the driver's cursor (see RawSql); scope lists as :s0, :s1, ...
_RES_COLUMNS = '"key", tenant, scopes, unit, amount, actual, status, created_at, settled_at'
_CLAIM = RawSql(
    'INSERT INTO budget_reservations ("key", tenant, scopes, unit, amount, status, created_at) '
    "VALUES (:key, :tenant, :scopes, :unit, :amount, :status, :created_at) "
    'ON CONFLICT ("key") DO NOTHING RETURNING "key"'
)
_TRANSITION_RAW = RawSql(
    "UPDATE budget_reservations SET status = :b_status, actual = :b_actual, settled_at = :now "
    f'WHERE "key" = :b_key AND status = :old RETURNING {_RES_COLUMNS}'
)
_CLAIM_SETTLED = RawSql(
    'INSERT INTO budget_reservations ("key", tenant, scopes, unit, amount, actual, status, created_at, '
    "settled_at) VALUES (:key, :tenant, :scopes, :unit, :amount, :actual, :status, :created_at, "
    ':settled_at) ON CONFLICT ("key") DO NOTHING RETURNING "key"'
)
_DRAW = RawSql(
    'UPDATE budget_reservations SET amount = amount - :n WHERE "key" = :b_key AND status = '
    "'reserved' AND amount >= :n"
)
_RES_STATUS = RawSql('SELECT status FROM budget_reservations WHERE "key" = :key')
_PG_TENANT_LOCK = RawSql("SELECT pg_advisory_xact_lock(:cls, hashtext(CAST(:key AS TEXT)))")


def _scope_params(scopes: Sequence[str]) -> dict[str, str]:
    return {f"s{n}": scope for n, scope in enumerate(scopes)}


def _in_scopes(count: int) -> str:
    return "tenant = :t AND unit = :u AND scope IN (" + ", ".join(f":s{n}" for n in range(count)) + ")"


@functools.lru_cache(maxsize=16)
def _charge(count: int) -> RawSql:
    return RawSql(
        f"UPDATE budgets SET reserved = reserved + :n, updated_at = :now WHERE {_in_scopes(count)} "
        "AND (cap IS NULL OR used + reserved + :n <= cap) RETURNING scope"
    )


@functools.lru_cache(maxsize=16)
def _headroom(count: int) -> RawSql:
    where = f"{_in_scopes(count)} AND cap IS NOT NULL"
    return RawSql(f"SELECT MIN(cap - used - reserved) FROM budgets WHERE {where}")


@functools.lru_cache(maxsize=16)
def _settle(count: int) -> RawSql:
    return RawSql(
        "UPDATE budgets SET reserved = reserved - :held, used = used + :charge, updated_at = :now "
        f"WHERE {_in_scopes(count)}"
    )


# -- what to do when a budget is exceeded --------------------------------------


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop: fail the step with the budget error."""

    exceeded: BudgetExceeded
    kind: Literal["stop"] = "stop"


@dataclass(frozen=True, slots=True)
class Fallback:
    """Retry the call with a cheaper model (reserve again with its estimate)."""

    model: str
    exceeded: BudgetExceeded
    kind: Literal["fallback"] = "fallback"


BudgetOutcome = Stop | Fallback


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    """A workflow's budget settings: the caps to install and what to do when one is hit."""

    max_tokens: int | None = None
    max_cost_micros: int | None = None
    on_exceed: Literal["stop", "fallback"] = "stop"
    fallback_model: str | None = None

    def __post_init__(self) -> None:
        if self.on_exceed not in ("stop", "fallback"):
            raise InvalidInputError(f"on_exceed must be 'stop' or 'fallback', got {self.on_exceed!r}")
        if self.on_exceed == "fallback" and not self.fallback_model:
            raise InvalidInputError("on_exceed: fallback needs fallback_model", hint="name the cheaper model")

    @classmethod
    def from_spec(cls, spec: BudgetSpec | None) -> BudgetPolicy:
        if spec is None:
            return cls()
        on_exceed: Literal["stop", "fallback"] = "fallback" if spec.on_exceed == "fallback" else "stop"
        return cls(spec.max_tokens, spec.max_cost_micros, on_exceed, spec.fallback_model)

    def caps(self) -> dict[str, int | None]:
        return {"tokens": self.max_tokens, "micros": self.max_cost_micros}

    async def install(self, ledger: BudgetLedger, tenant: str, scope: str) -> None:
        """Set both caps on ``scope`` (typically ``run:<id>`` when a run starts)."""
        for unit, cap in self.caps().items():
            await ledger.set_cap(tenant, scope, unit, cap)

    def decide(self, exceeded: BudgetExceeded, *, model: str | None = None) -> BudgetOutcome:
        """Stop, or fall back to the cheaper model once (already on it: stop)."""
        if self.on_exceed == "fallback" and self.fallback_model and model != self.fallback_model:
            return Fallback(self.fallback_model, exceeded)
        return Stop(exceeded)


__all__ = [
    "ALLOTMENT_PREFIX",
    "UNITS",
    "BudgetExceeded",
    "BudgetLedger",
    "BudgetOutcome",
    "BudgetPolicy",
    "BudgetUsage",
    "Fallback",
    "Reservation",
    "Stop",
    "budget_scopes",
]
