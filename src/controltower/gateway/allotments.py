"""Budget allotments: a gateway's share of a budget chain, spent call by call without a commit.

A priced tool call must hold a reservation on its run, workflow, department and tenant budgets
BEFORE it runs, visible to every process, or caps are not exact. Made per call, that is one store
round trip (and on PostgreSQL a WAL flush) in front of every priced call. An allotment makes it
one per many calls: the gateway reserves ``calls_per_grant`` times the call's price at once, as
an ordinary reservation (key ``allot:<gateway>:<n>``), and then takes each call's price out of it
in memory. Each call is charged in the transaction that records its result and audit record
(:meth:`BudgetLedger.draw_in`): its own committed reservation row (so a replay never charges it
twice), the allotment's row shrinks by the price, and every scope moves the price from reserved
to used. What an allotment has not spent is given back when it is retired.

Why caps stay exact: an allotment is a reservation, checked against every cap like any other;
``used + reserved`` never passes a cap, however many processes hold allotments. The price is
drawn from one only while the allotment's row still holds it, and the row always holds exactly
what was granted minus what was charged (both in store transactions), so a crash leaves the
unspent rest reserved until :meth:`BudgetLedger.expire_allotments_in` gives it back.

The cost of exactness is headroom held by allotments that are not spent yet. So that nobody is
refused for money another gateway holds idle:

- an allotment is at most ``1 / headroom_share`` of the chain's headroom (the least
  ``cap - used - reserved`` over its capped budgets) and at least two calls; closer to a cap,
  calls reserve one by one, exactly as without allotments;
- it serves new calls for ``ttl`` seconds at most; its unspent part is given back as soon as it
  is expired, spent or replaced, the rest when its calls in flight are charged (a timer retires
  an idle one; :meth:`aclose` gives everything back);
- a call refused by a cap retries (up to three times) when this gateway gave money back since
  the call tried, after giving back its own allotments of the tenant: one gateway alone spends
  a cap exactly; across gateways, a call can be refused while another holds an unspent share
  for at most ``ttl`` seconds;
- allotments are not used when a policy reads the cost so far (``context.run_cost_cents``),
  which must count what was charged, not what was set aside, nor for calls that wait for an
  approval (their reservation must outlive this process).

A chain that keeps calling gets twice the previous allotment each time (up to
``max_calls_per_grant`` calls), reserved in the background when half of the current one is
spent (``prefetch``): the store's queue takes it before the records waiting to be written, and
the store thread marks it committed, so even a caller that never yields to the event loop picks
it up at its next call.

A crashed gateway's allotments are given back when any gateway next grants one and they are
older than ``stale_after`` seconds (10 minutes by default: longer than a live gateway keeps
one, plus the longest tool call charged from it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Connection

from controltower.gateway.budgets import ALLOTMENT_PREFIX, BudgetLedger, Reservation

log = logging.getLogger("controltower.gateway.allotments")

Chain = tuple[str, tuple[str, ...]]  # (tenant, scopes sorted)


@dataclass(eq=False, slots=True)
class Allotment:
    key: str
    tenant: str
    scopes: tuple[str, ...]  # as reserved (validated, in the caller's order)
    granted: int
    left: int  # not yet taken by a call (in memory; the row holds left + in-flight takes)
    born: float
    inflight: int = 0
    retiring: bool = False  # no more takes; given back once in-flight calls are charged
    timer: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class _Prefetch:
    key: str
    scopes: list[str]
    cost: int
    result: Reservation | None = None
    done: bool = False  # set by the store thread after the commit


@dataclass(slots=True)
class Draw:
    """One call's charge: from an allotment (``allotment`` set) or its own reservation."""

    cost: int
    scopes: list[str] = field(default_factory=list)
    allotment: Allotment | None = None
    charged: bool = False  # the record that charges it is queued: nothing to give back
    granting: Chain | None = None  # this call asked for a new allotment on this chain


class Allotments:
    """The allotments of one gateway (one process); all methods run on its event loop."""

    def __init__(
        self,
        ledger: BudgetLedger,
        *,
        calls_per_grant: int = 64,
        max_calls_per_grant: int = 1024,
        headroom_share: int = 16,
        ttl: float = 5.0,
        stale_after: float = 600.0,
        enabled: bool = True,
        prefetch: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ledger = ledger
        self.calls_per_grant = calls_per_grant
        self.max_calls_per_grant = max(max_calls_per_grant, calls_per_grant)
        self.headroom_share = headroom_share
        self.ttl = ttl
        self.stale_after = stale_after
        self.enabled = enabled
        self.prefetch = prefetch
        self._clock = clock
        self._id = uuid.uuid4().hex[:12]
        self._seq = itertools.count(1)
        self._active: dict[Chain, Allotment] = {}
        self._granting: dict[Chain, asyncio.Event] = {}  # set once the grant is known
        self._prefetching: dict[Chain, _Prefetch] = {}
        self._calls: dict[Chain, int] = {}  # calls the chain's last allotment was made for
        self._last_sweep = -math.inf
        self._retiring: set[Allotment] = set()
        self._releases: set[asyncio.Future[Any]] = set()
        self.granted = 0  # allotments granted (for tests and the benchmark)
        self.drawn = 0  # calls charged from an allotment
        self.prefetched = 0  # allotments granted in the background, before the last one ran out
        self.returned = 0  # give-backs queued: a call refused by a cap since then may try again

    # -- the call path (no await: nothing here waits for the store) -------------------------

    def take(self, tenant: str, scopes: list[str], cost: int) -> Draw:
        """Take ``cost`` from this chain's allotment if it has it; else a draw to reserve for."""
        draw = Draw(cost, scopes)
        if not self.enabled or cost <= 0:
            return draw
        chain = (tenant, tuple(sorted(scopes)))
        if chain in self._prefetching:
            self._landed(chain)
        allot = self._active.get(chain)
        if allot is not None and (allot.left < cost or self._clock() - allot.born >= self.ttl):
            self._retire(chain, allot)
            allot = None
        if allot is not None:
            allot.left -= cost
            allot.inflight += 1
            draw.allotment = allot
            half_spent = allot.left < allot.granted // 2
            if self.prefetch and half_spent and chain not in self._granting and not allot.retiring:
                # the next allotment is reserved in the background: no call waits for a grant
                self._prefetch(chain, list(scopes), cost)
        elif chain not in self._granting:
            self._granting[chain] = asyncio.Event()  # this call's reservation: the next allotment
            draw.granting = chain
        return draw

    def grant_size(self, draw: Draw) -> int:
        """What to reserve for ``draw``'s chain: twice the last allotment of a busy chain (up to
        ``max_calls_per_grant`` calls), so that grants get rarer as a chain keeps calling."""
        if draw.granting is None:
            return 0
        return draw.cost * self._next_calls(draw.granting)

    def _next_calls(self, chain: Chain) -> int:
        last = self._calls.get(chain)
        return self.calls_per_grant if last is None else min(2 * last, self.max_calls_per_grant)

    def sweep_due(self) -> bool:
        """Whether a grant should also give back dead processes' allotments (once a minute)."""
        now = self._clock()
        if now - self._last_sweep < min(60.0, self.stale_after):
            return False
        self._last_sweep = now
        return True

    def new_key(self) -> str:
        return f"{ALLOTMENT_PREFIX}{self._id}:{next(self._seq)}"

    def grant_in(
        self, conn: Connection, key: str, tenant: str, scopes: list[str], cost: int, size: int, sweep: bool
    ) -> Reservation | None:
        """Reserve an allotment of at most ``size`` in the caller's transaction, as much as the
        chain's headroom allows (``headroom_share`` of it); None: too close to a cap."""
        ledger = self.ledger
        if sweep:
            ledger.expire_allotments_in(conn, self.stale_after)
        room = ledger.headroom_in(conn, tenant, scopes, "micros")
        if room is not None:
            size = min(size, room // self.headroom_share)
        if size < 2 * cost:
            return None
        got = ledger.reserve_in(conn, key, tenant, scopes, "micros", size)
        return got if isinstance(got, Reservation) else None

    def _prefetch(self, chain: Chain, scopes: list[str], cost: int) -> None:
        """Queue the chain's next allotment now. A caller that never yields to the event loop
        (sequential calls that all take fast paths) still sees it land: the store thread marks
        it committed (``on_commit``) and the next :meth:`take` installs it."""
        key, size, sweep = self.new_key(), cost * self._next_calls(chain), self.sweep_due()
        pending = _Prefetch(key, scopes, cost)
        self._granting[chain] = asyncio.Event()
        self._prefetching[chain] = pending
        grant_in, tenant = self.grant_in, chain[0]

        def job(conn: Connection) -> Reservation | None:
            return grant_in(conn, key, tenant, scopes, cost, size, sweep)

        def committed(got: Reservation | None) -> None:  # on the store thread
            pending.result, pending.done = got, True

        # urgent: a new reservation does not depend on the records queued before it (giving
        # back allotments, which does, stays in order after them)
        future = self.ledger.store.run_soon(job, durable=False, on_commit=committed, urgent=True)
        self._track(future)
        future.add_done_callback(lambda f: self._landed(chain, f))

    def _landed(self, chain: Chain, future: asyncio.Future[Any] | None = None) -> None:
        """Install the chain's prefetched allotment once it is committed (or drop a failed one)."""
        pending = self._prefetching.get(chain)
        if pending is None:
            return
        error: BaseException | None = None
        if future is not None:
            error = asyncio.CancelledError() if future.cancelled() else future.exception()
        if not pending.done and error is None:
            return
        del self._prefetching[chain]
        self._grant_known(chain)
        if error is not None:  # the calls reserve one by one meanwhile
            log.warning("could not reserve a budget allotment in the background: %r", error)
        elif pending.result is not None:
            self._install(
                chain, pending.key, pending.result.amount, pending.scopes, pending.cost, taken=False
            )
            self.prefetched += 1

    def granted_to(self, draw: Draw, key: str | None, size: int) -> None:
        """The reservation made for ``draw``: an allotment of ``size`` under ``key`` (None: the
        call's own reservation, the chain being too close to a cap)."""
        chain, draw.granting = draw.granting, None
        if chain is None:
            return
        self._grant_known(chain)
        if key is not None:
            draw.allotment = self._install(chain, key, size, draw.scopes, draw.cost, taken=True)

    def _install(
        self, chain: Chain, key: str, size: int, scopes: list[str], cost: int, *, taken: bool
    ) -> Allotment:
        """Make a granted allotment the chain's (the one it replaces gives its rest back)."""
        old = self._active.pop(chain, None)
        if old is not None:
            self._retire(chain, old)
        if len(self._calls) >= 4096:  # one entry per chain (run) seen: keep it bounded
            self._calls.clear()  # (a chain then starts again at calls_per_grant)
        self._calls[chain] = max(1, size // cost)
        allot = Allotment(key, chain[0], tuple(scopes), size, size - cost * taken, self._clock(), int(taken))
        allot.timer = asyncio.get_running_loop().call_later(self.ttl, self._expire, chain, allot)
        self._active[chain] = allot
        self.granted += 1
        return allot

    def settle(self, draw: Draw) -> None:
        """The call is over: give its price back to the allotment unless its charge is queued."""
        if draw.granting is not None:  # the reservation never happened (an error before it)
            self._grant_known(draw.granting)
            draw.granting = None
        allot, draw.allotment = draw.allotment, None
        if allot is None:
            return
        allot.inflight -= 1
        if draw.charged:
            self.drawn += 1
        else:
            allot.left += draw.cost
        if allot.retiring and allot.inflight == 0:
            self._give_back(allot)

    # -- retiring ---------------------------------------------------------------------------

    def _grant_known(self, chain: Chain) -> None:
        event = self._granting.pop(chain, None)
        if event is not None:
            event.set()

    def holds(self, tenant: str) -> bool:
        """Whether this gateway holds (or is being granted) an allotment of ``tenant``."""
        return any(chain[0] == tenant for chain in (*self._active, *self._granting))

    async def reclaim(self, tenant: str) -> None:
        """Give back what this tenant's allotments hold unspent (a call was refused by a cap),
        once the grants in progress are known; see :attr:`returned`."""
        pending = [event.wait() for chain, event in self._granting.items() if chain[0] == tenant]
        if pending:
            await asyncio.wait_for(asyncio.gather(*pending), timeout=30)
        for chain, allot in list(self._active.items()):
            if chain[0] == tenant:
                self._retire(chain, allot)
        await self.drain()

    async def aclose(self) -> None:
        """Give every allotment back (call before closing the store)."""
        while True:  # a grant in the background may land meanwhile
            for chain, allot in list(self._active.items()):
                self._retire(chain, allot)
            await self.drain()
            if not self._active:
                return

    async def drain(self) -> None:
        while self._releases:
            await asyncio.gather(*list(self._releases), return_exceptions=True)

    def _expire(self, chain: Chain, allot: Allotment) -> None:
        if self._active.get(chain) is allot:  # idle for ttl seconds: the chain starts small again
            self._calls.pop(chain, None)
            self._retire(chain, allot)

    def _retire(self, chain: Chain, allot: Allotment) -> None:
        if self._active.get(chain) is allot:
            del self._active[chain]
        if allot.retiring:
            return
        allot.retiring = True
        if allot.timer is not None:
            allot.timer.cancel()
        if allot.inflight == 0:
            self._give_back(allot)
            return
        self._retiring.add(allot)
        if allot.left > 0:  # the unspent part now; what is in flight when its calls are over
            amount, allot.left = allot.left, 0
            self.returned += 1
            shrink_in, key, tenant, scopes = self.ledger.shrink_in, allot.key, allot.tenant, allot.scopes
            self._track(self.ledger.store.run_soon(lambda conn: shrink_in(conn, key, tenant, scopes, amount)))

    def _give_back(self, allot: Allotment) -> None:
        """Release the allotment's row (what no call was charged). Queued after the records of
        its calls (the store commits in queue order), so the row then holds only the unspent."""
        self._retiring.discard(allot)
        self.returned += 1
        release_in, key = self.ledger.release_in, allot.key
        self._track(self.ledger.store.run_soon(lambda conn: release_in(conn, key)))

    def _track(self, future: asyncio.Future[Any]) -> None:
        self._releases.add(future)
        future.add_done_callback(self._released)

    def _released(self, future: asyncio.Future[Any]) -> None:
        self._releases.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.warning("could not give back a budget allotment: %s", future.exception())


__all__ = ["Allotment", "Allotments", "Draw"]
