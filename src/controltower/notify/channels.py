"""Where notifications go: an HTTP webhook (Slack-compatible) or email over SMTP.

A channel delivers one notification or raises :class:`DeliveryError`; retrying is the
notifier's job. Channel descriptions never include credentials: a Slack webhook URL is
itself a secret, so only its host is ever shown.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Literal, Protocol
from urllib.parse import urlsplit

import httpx

from controltower.notify.messages import Notification


class DeliveryError(Exception):
    """A failed delivery; ``retryable=False`` when sending the same thing again cannot help."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class Channel(Protocol):
    @property
    def name(self) -> str: ...

    async def deliver(self, notification: Notification) -> None: ...

    async def aclose(self) -> None: ...


class _HideUrls(logging.Filter):
    """httpx logs every request URL at INFO; a chat webhook URL is a credential, so mask it."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if self.urls and isinstance(record.args, tuple):
            record.args = tuple(
                self.urls.get(str(a), a) if not isinstance(a, int) else a for a in record.args
            )
        return True


_HIDDEN = _HideUrls()
logging.getLogger("httpx").addFilter(_HIDDEN)


class WebhookChannel:
    """POSTs the Slack-compatible JSON (``text`` + ``blocks``) to a URL (never logged in full)."""

    def __init__(self, url: str, *, timeout: float = 10.0, transport: httpx.AsyncBaseTransport | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("a notification webhook URL starts with https:// (or http://)")
        self.url = url
        self.name = f"webhook:{parts.hostname}"
        _HIDDEN.urls[url] = f"{parts.scheme}://{parts.netloc}/***"
        self._client = httpx.AsyncClient(timeout=timeout, transport=transport)

    async def deliver(self, notification: Notification) -> None:
        try:
            answer = await self._client.post(self.url, json=notification.slack())
        except httpx.HTTPError as exc:
            raise DeliveryError(f"{self.name}: {type(exc).__name__}") from None
        if answer.status_code >= 300:
            retryable = answer.status_code in (408, 425, 429) or answer.status_code >= 500
            raise DeliveryError(f"{self.name} answered HTTP {answer.status_code}", retryable=retryable)

    async def aclose(self) -> None:
        await self._client.aclose()


@dataclass
class EmailChannel:
    """Sends a plain-text email through an SMTP server (stdlib ``smtplib``, off the event loop)."""

    host: str
    sender: str
    recipients: list[str]
    port: int = 25
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    security: Literal["none", "starttls", "ssl"] = "none"
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if not self.recipients:
            raise ValueError("an email channel needs at least one recipient")

    @property
    def name(self) -> str:
        return f"smtp:{self.host}:{self.port}"

    async def deliver(self, notification: Notification) -> None:
        message = notification.email(self.sender, self.recipients)
        try:
            await asyncio.to_thread(self._send, message)
        except smtplib.SMTPRecipientsRefused as exc:
            raise DeliveryError(f"{self.name} refused every recipient", retryable=False) from exc
        except smtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(f"{self.name} rejected the credentials", retryable=False) from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryError(f"{self.name}: {type(exc).__name__}") from None

    def _send(self, message: EmailMessage) -> None:
        context = ssl.create_default_context()
        smtp: smtplib.SMTP
        if self.security == "ssl":
            smtp = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=context)
        else:
            smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        with smtp:
            if self.security == "starttls":
                smtp.starttls(context=context)
            if self.username:
                smtp.login(self.username, self.password or "")
            smtp.send_message(message)

    async def aclose(self) -> None:
        return None
