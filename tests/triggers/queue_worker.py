"""A queue-trigger consumer in its own process: ``python -m tests.triggers.queue_worker ...``.

Prints ``ready`` once consuming, ``started <message id> <run id>`` after each run it starts.
With ``--crash-after N`` it dies (exit 17) right after starting the Nth run and before the ack.
It also runs the engine's worker loop with a short lease, so runs orphaned by a crash finish.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from tests.triggers.helpers import spec

from controltower.engine import EmbeddedEngine
from controltower.spec.models import QueueTrigger
from controltower.triggers.queues import QueueMessage, consumer_for

CRASH_EXIT = 17


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("backend", choices=["redis", "nats"])
    parser.add_argument("db")
    parser.add_argument("stream")
    parser.add_argument("--subject")
    parser.add_argument("--consumer", required=True)
    parser.add_argument("--crash-after", type=int, default=0)
    args = parser.parse_args()

    engine = await EmbeddedEngine.open(args.db, lease=1.0, poll_interval=0.1)
    await engine.publish(spec("queued"))
    trigger = QueueTrigger(
        backend=args.backend, stream=args.stream, subject=args.subject, claim_after=1.0, batch=5
    )
    started = 0

    async def on_started(msg: QueueMessage, run_id: str) -> None:
        nonlocal started
        started += 1
        print(f"started {msg.id} {run_id}", flush=True)
        if started == args.crash_after:
            os._exit(CRASH_EXIT)  # the run is committed, the message is not acknowledged

    consumer = consumer_for(engine, "queued", trigger, consumer=args.consumer, on_started=on_started)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await asyncio.gather(consumer.serve(stop), engine.work(stop))
    await engine.close()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
