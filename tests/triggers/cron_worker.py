"""A cron scheduler in its own process: ``python -m tests.triggers.cron_worker DB_URL NOW [NOW ...]``.

Fires the due ticks of workflow ``nightly`` (every five minutes) at each given time and prints
how many runs this process started or found.
"""

from __future__ import annotations

import asyncio
import sys

from controltower.engine import EmbeddedEngine
from controltower.triggers._common import latest_published
from controltower.triggers.cron import CronEntry, CronScheduler


async def main(url: str, times: list[float]) -> None:
    async with await EmbeddedEngine.open(url) as engine:
        entries = [e for p in await latest_published(engine.store) for e in CronEntry.of(p)]
        scheduler = CronScheduler(engine)
        fired = 0
        for now in times:
            fired += len(await scheduler.fire_due(entries, now=now))
        await engine.drain()
        print(f"fired {fired}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], [float(x) for x in sys.argv[2:]]))
