"""Notifications: approval requests, escalations and run failures to chat webhooks and email."""

from controltower.notify.channels import Channel, DeliveryError, EmailChannel, WebhookChannel
from controltower.notify.messages import (
    Notification,
    approval_notification,
    run_failed_notification,
    step_approval_notification,
)
from controltower.notify.notifier import Notifier
from controltower.notify.outbox import Outbox, OutboxRow

__all__ = [
    "Channel",
    "DeliveryError",
    "EmailChannel",
    "Notification",
    "Notifier",
    "Outbox",
    "OutboxRow",
    "WebhookChannel",
    "approval_notification",
    "run_failed_notification",
    "step_approval_notification",
]
