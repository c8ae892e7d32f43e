"""Model requests as durable, metered steps (needs the ``llm`` extra: pydantic-ai).

Two wrappers around pydantic-ai models, composed like pydantic-ai's own:

- :class:`MeteredModel` wraps one named model: it reserves the call's estimated tokens and
  micro-dollars on the budget ledger (run → workflow → department → tenant, plus the agent's
  own budget), enforces the per-request timeout, and notes what the call really used. When a
  reservation would pass a cap, the budget decides: stop the step, or fall back to the next
  (cheaper) model of the chain.
- :class:`DurableModel` wraps the whole chain (one model, or pydantic-ai's ``FallbackModel``
  for fallbacks on error, timeout or budget). It numbers the requests of one step; a request
  already recorded in ``model_calls`` is answered from the record — the model is NOT called
  again. A new response is recorded in the same transaction that settles its budget charge,
  so a crash cannot leave a charged call unrecorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic_ai.messages import ModelMessage, ModelMessagesTypeAdapter, ModelResponse
from pydantic_ai.models import Model, ModelRequestParameters, StreamedResponse
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.settings import ModelSettings
from sqlalchemy.engine import Connection

from controltower.gateway.audit import AuditEvent, AuditLog, AuditRecord
from controltower.gateway.budgets import BudgetExceeded, BudgetLedger, BudgetPolicy
from controltower.gateway.ratelimit import run_retrying
from controltower.models.calls import ModelCallLog, ModelCallRecord
from controltower.models.errors import ModelBudgetExceededError
from controltower.models.prices import PriceTable
from controltower.store import SqlStore

DEFAULT_OUTPUT_ESTIMATE = 512  # output tokens reserved per call when the agent sets no max_tokens


class BudgetFallback(Exception):
    """A budget cap refused this model and the budget says: try the cheaper fallback model."""

    def __init__(self, exceeded: BudgetExceeded) -> None:
        super().__init__(str(exceeded))
        self.exceeded = exceeded


class ModelTimeoutError(Exception):
    """One model request took longer than its timeout (the chain falls back, if it can)."""


@dataclass(slots=True)
class CallSite:
    """Where an agent's model calls are recorded and charged."""

    run_id: str
    step_key: str
    tenant: str
    workflow: str
    agent: str | None
    scopes: list[str]
    prices: PriceTable
    policy: BudgetPolicy = field(default_factory=BudgetPolicy)
    store: SqlStore | None = None
    ledger: BudgetLedger | None = None
    log: ModelCallLog | None = None
    audit: AuditLog | None = None  # the gateway's chain: each completed model call is a record


@dataclass(slots=True)
class Charge:
    model: str
    input_tokens: int
    output_tokens: int
    cost_micros: int
    keys: tuple[str, str] | None  # (micros, tokens) reservation keys


@dataclass(slots=True)
class CallState:
    """Shared by the durable wrapper and the metered models of one agent run."""

    index: int = 0
    charge: Charge | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)


def estimate_tokens(messages: list[ModelMessage]) -> int:
    """About four characters per token: a reservation, settled at the real count after the call."""
    return len(ModelMessagesTypeAdapter.dump_json(messages)) // 4 + 1


class MeteredModel(WrapperModel):
    def __init__(
        self,
        name: str,
        model: Model,
        site: CallSite,
        state: CallState,
        *,
        timeout: float | None,
        max_tokens: int | None,
    ) -> None:
        super().__init__(model)
        self.name = name
        self.site = site
        self.state = state
        self.timeout = timeout
        self.max_tokens = max_tokens

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        keys = await self._reserve(messages, model_settings)
        try:
            call = self.wrapped.request(messages, model_settings, model_request_parameters)
            response = await (asyncio.wait_for(call, self.timeout) if self.timeout else call)
        except BaseException as exc:
            await self._release(keys)
            if isinstance(exc, Exception):
                reason = f"timed out after {self.timeout}s" if isinstance(exc, TimeoutError) else str(exc)
                self.state.attempts.append(
                    {"model": self.name, "error": type(exc).__name__, "reason": reason}
                )
            if isinstance(exc, TimeoutError):
                raise ModelTimeoutError(f"model {self.name} timed out after {self.timeout}s") from None
            raise
        used_in, used_out = response.usage.input_tokens, response.usage.output_tokens
        cost = self.site.prices.cost(self.name, used_in, used_out)
        self.state.charge = Charge(self.name, used_in, used_out, cost, keys)
        return response

    async def _reserve(
        self, messages: list[ModelMessage], settings: ModelSettings | None
    ) -> tuple[str, str] | None:
        site, ledger = self.site, self.site.ledger
        if ledger is None:
            return None
        out = self.max_tokens or (settings or {}).get("max_tokens") or DEFAULT_OUTPUT_ESTIMATE
        est_in, est_out = estimate_tokens(messages), int(out)
        base = f"model:{site.tenant}/{site.run_id}/{site.step_key}/{self.state.index}/{self.name}"
        keys = (f"{base}#micros", f"{base}#tokens")
        try:
            cost = site.prices.cost(self.name, est_in, est_out)
            await ledger.reserve(keys[0], site.tenant, site.scopes, "micros", cost)
            try:
                await ledger.reserve(keys[1], site.tenant, site.scopes, "tokens", est_in + est_out)
            except BudgetExceeded:
                await ledger.release(keys[0])
                raise
        except BudgetExceeded as exc:
            self.state.attempts.append({"model": self.name, "error": "budget_exceeded", "reason": str(exc)})
            if site.policy.decide(exc, model=self.name).kind == "fallback":
                raise BudgetFallback(exc) from None
            raise ModelBudgetExceededError(str(exc), hint=exc.hint) from None
        return keys

    async def _release(self, keys: tuple[str, str] | None) -> None:
        if keys is not None and self.site.ledger is not None:
            for key in keys:
                await self.site.ledger.release(key)


class DurableModel(WrapperModel):
    def __init__(self, chain: Model, site: CallSite, state: CallState) -> None:
        super().__init__(chain)
        self.site = site
        self.state = state
        self._next = 0
        self._recorded: dict[int, ModelCallRecord] | None = None
        self.replayed = 0  # requests answered from the record in this run of the agent

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        site = self.site
        index = self._next
        self._next += 1
        if site.log is not None:
            if self._recorded is None:  # requests of one step are sequential: read them all once
                self._recorded = await site.log.for_step(site.run_id, site.step_key)
            recorded = self._recorded.pop(index, None)
            if recorded is not None:
                self.replayed += 1
                return load_response(recorded.response)
        self.state.index, self.state.charge, self.state.attempts = index, None, []
        started = time.time()
        response = await self.wrapped.request(messages, model_settings, model_request_parameters)
        charge = self.state.charge
        if charge is None:  # pragma: no cover - every chain member is metered
            raise RuntimeError("a model answered outside the metered chain")
        if site.store is not None and site.log is not None:
            record = ModelCallRecord(
                run_id=site.run_id,
                step_key=site.step_key,
                call_index=index,
                tenant=site.tenant,
                workflow=site.workflow,
                agent=site.agent,
                model=charge.model,
                request=ModelMessagesTypeAdapter.dump_json(messages[-1:]).decode(),
                response=_dump_response(response),
                input_tokens=charge.input_tokens,
                output_tokens=charge.output_tokens,
                cost_micros=charge.cost_micros,
                attempts=list(self.state.attempts) or None,
                started_at=started,
                finished_at=time.time(),
            )
            rows = site.audit.prepare([_audit_event(record)]) if site.audit is not None else []
            written = await run_retrying(site.store, lambda conn: self._settle(conn, record, charge, rows))
            if site.audit is not None:
                await site.audit.publish(written)
        return response

    def _settle(
        self, conn: Connection, record: ModelCallRecord, charge: Charge, audit_rows: list[dict[str, Any]]
    ) -> list[AuditRecord]:
        """The call's record, its budget charge and its audit record commit together."""
        assert self.site.log is not None
        self.site.log.record_in(conn, record)
        if charge.keys is not None and self.site.ledger is not None:
            self.site.ledger.commit_in(conn, charge.keys[0], charge.cost_micros)
            self.site.ledger.commit_in(conn, charge.keys[1], charge.input_tokens + charge.output_tokens)
        if audit_rows and self.site.audit is not None:
            return self.site.audit.append_prepared_in(conn, audit_rows)
        return []

    @contextlib.asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: Any = None,
    ) -> AsyncIterator[StreamedResponse]:
        raise NotImplementedError("durable model calls are not streamed")
        yield  # pragma: no cover


def _audit_event(record: ModelCallRecord) -> AuditEvent:
    """Who asked which model, at what cost: digests, not the prompt or the answer (they may
    carry customer data; the model_calls table keeps them for replay)."""
    return AuditEvent(
        tenant=record.tenant,
        actor=f"agent:{record.agent}" if record.agent else f"workflow:{record.workflow}",
        kind="model_call",
        subject=record.model,
        run_id=record.run_id,
        workflow=record.workflow,
        outcome="ok",
        inputs_digest=hashlib.sha256(record.request.encode()).hexdigest(),
        data={
            "step_key": record.step_key,
            "call_index": record.call_index,
            "input_tokens": record.input_tokens,
            "output_tokens": record.output_tokens,
            "cost_micros": record.cost_micros,
            "output_digest": hashlib.sha256(record.response.encode()).hexdigest(),
            "fallbacks": record.attempts or [],
        },
    )


def _dump_response(response: ModelResponse) -> str:
    """The response as JSON, without the provider's URL (a base URL may carry credentials)."""
    (data,) = ModelMessagesTypeAdapter.dump_python([response], mode="json")
    data.pop("provider_url", None)
    return json.dumps([data], separators=(",", ":"))


def load_response(text: str) -> ModelResponse:
    (message,) = ModelMessagesTypeAdapter.validate_json(text)
    if not isinstance(message, ModelResponse):  # pragma: no cover - we only record responses
        raise TypeError("recorded model call is not a response")
    return message


def describe_request(text: str) -> Any:
    """A recorded request as plain JSON (for ``tower show`` and tests)."""
    return json.loads(text)
