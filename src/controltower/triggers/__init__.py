"""Triggers: webhooks, cron schedules and queue consumers that start runs exactly once.

The webhook endpoint lives in :mod:`controltower.triggers.webhooks` (needs FastAPI, the
``server`` extra); queue consumers need the ``queues`` extra.
"""

from controltower.triggers.cron import CronEntry, CronScheduler
from controltower.triggers.queues import NatsJetStreamConsumer, QueueMessage, RedisStreamConsumer
from controltower.triggers.runner import TriggerRunner
from controltower.triggers.signing import WebhookError, sign, signature, verify

__all__ = [
    "CronEntry",
    "CronScheduler",
    "NatsJetStreamConsumer",
    "QueueMessage",
    "RedisStreamConsumer",
    "TriggerRunner",
    "WebhookError",
    "sign",
    "signature",
    "verify",
]
