"""The HTTP API: FastAPI routes over the engine, the gateway and the auth service."""

from __future__ import annotations

from controltower.api.app import create_app
from controltower.api.deps import Services, current_principal, require, services

__all__ = ["Services", "create_app", "current_principal", "require", "services"]
