"""The dashboard's pages under ``/ui``: server-rendered HTML, HTMX for live parts.

Every page reads the signed-in principal from the session cookie and shows only its
tenant's data; another tenant's run or approval is a plain 404. Decisions go through the
same calls as the CLI and the API (``ToolGateway.decide`` then ``engine.wake`` for governed
calls, ``engine.decide`` for approval steps).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from controltower.auth import AuthError, Principal
from controltower.dashboard import queries as q
from controltower.dashboard import session as sess
from controltower.dashboard.pages import Pages, services
from controltower.gateway.approvals import ApprovalBook, Approver, NotAllowedToApprove
from controltower.gateway.audit import AuditLog
from controltower.spec.errors import ConflictError, InvalidInputError, NotFoundError, TowerError
from controltower.store import TERMINAL

STATIC = {"htmx.min.js": "text/javascript", "tower.css": "text/css"}
MAX_FORM_BYTES = 256 * 1024


def build_router() -> APIRouter:
    """All dashboard routes; ``create_app`` includes this router (static assets under /ui/static)."""
    router = APIRouter(prefix="/ui", include_in_schema=False)
    pages = Pages()

    async def signed_in(request: Request) -> Principal | None:
        sid = request.cookies.get(sess.SESSION_COOKIE)
        if not sid:
            return None
        return await services(request).auth.session_principal(sid)

    async def form(request: Request) -> dict[str, str]:
        if int(request.headers.get("content-length") or 0) > MAX_FORM_BYTES:
            raise InvalidInputError(f"the form is larger than {MAX_FORM_BYTES // 1024} KiB")
        data = await request.form()
        return {k: v for k, v in data.items() if isinstance(v, str)}

    # -- assets, login, logout ------------------------------------------------------------

    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in STATIC:
            return Response("not found", status_code=404, media_type="text/plain")
        body = resources.files("controltower.dashboard").joinpath("static", name).read_bytes()
        return Response(body, media_type=STATIC[name], headers={"Cache-Control": "public, max-age=3600"})

    @router.get("")
    @router.get("/")
    async def home() -> Response:
        return RedirectResponse("/ui/runs", status_code=303)

    @router.get("/login")
    async def login_page(request: Request, next: str | None = None) -> Response:
        if await signed_in(request) is not None:
            return RedirectResponse(sess.safe_next(next), status_code=303)
        return pages.login(request, next=sess.safe_next(next))

    @router.post("/login")
    async def login(request: Request) -> Response:
        try:
            data = await form(request)
        except InvalidInputError as exc:
            return pages.login(request, error=exc.message, http_status=400)
        target = sess.safe_next(data.get("next"))
        if not sess.login_csrf_ok(request, data.get("csrf")):
            return pages.login(
                request, next=target, error="The form expired; please sign in again.", http_status=400
            )
        tenant, username = data.get("tenant", "").strip(), data.get("username", "").strip()
        try:
            principal = await services(request).auth.login(tenant, username, data.get("password", ""))
        except AuthError:
            return pages.login(
                request, next=target, tenant=tenant, username=username, http_status=401,
                error="Wrong tenant, username or password.",
            )  # fmt: skip
        sid = await services(request).auth.create_session(principal)
        response = RedirectResponse(target, status_code=303)
        sess.set_session(response, request, sid)
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        data = await form(request)
        sid = request.cookies.get(sess.SESSION_COOKIE)
        if sid and sess.csrf_ok(request, data.get("csrf")):
            await services(request).auth.end_session(sid)
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(sess.SESSION_COOKIE, path="/")
        return response

    # -- runs -----------------------------------------------------------------------------

    def run_filters(workflow: str | None, status: str | None) -> tuple[str | None, str | None]:
        return (workflow or None), (status if status in q.RUN_STATUSES else None)

    @router.get("/runs")
    async def runs_page(
        request: Request, workflow: str | None = None, status: str | None = None, before: str | None = None
    ) -> Response:
        who = await signed_in(request)
        if who is None:
            return sess.to_login(request)
        workflow, status = run_filters(workflow, status)
        store = services(request).store
        runs = await q.list_runs(store, who.tenant, workflow=workflow, status=status, before=before)
        names = await q.workflow_names(store, who.tenant)
        return pages.render(
            request, who, "runs.html", active="runs", runs=runs, workflows=names,
            statuses=q.RUN_STATUSES, workflow=workflow, status=status, before=before, page=q.RUNS_PAGE,
        )  # fmt: skip

    @router.get("/runs/table")
    async def runs_table(
        request: Request, workflow: str | None = None, status: str | None = None, before: str | None = None
    ) -> Response:
        who = await signed_in(request)
        if who is None:
            return sess.to_login(request)
        workflow, status = run_filters(workflow, status)
        store = services(request).store
        runs = await q.list_runs(store, who.tenant, workflow=workflow, status=status, before=before)
        return pages.render(
            request, who, "_runs_table.html", runs=runs, workflow=workflow, status=status, before=before,
            page=q.RUNS_PAGE,
        )  # fmt: skip

    @router.get("/runs/{run_id}")
    async def run_page(request: Request, run_id: str) -> Response:
        who = await signed_in(request)
        if who is None:
            return sess.to_login(request)
        detail = await q.run_detail(services(request).store, who.tenant, run_id)
        if detail is None:
            return pages.error(request, who, 404, f"No run {run_id} in tenant {who.tenant}.")
        return pages.render(request, who, "run.html", active="runs", d=detail, terminal=TERMINAL)

    @router.get("/runs/{run_id}/live")
    async def run_live(request: Request, run_id: str) -> Response:
        who = await signed_in(request)
        if who is None:
            return sess.to_login(request)
        detail = await q.run_detail(services(request).store, who.tenant, run_id)
        if detail is None:
            return Response(status_code=404)
        return pages.render(request, who, "_run_live.html", d=detail, terminal=TERMINAL)

    @router.post("/runs/{run_id}/approval-step")
    async def decide_step(request: Request, run_id: str) -> Response:
        """Decide a workflow's own approval step: the engine call behind ``tower approve``."""
        who = await signed_in(request)
        if who is None:
            return sess.to_login(request)
        data = await form(request)
        if not sess.csrf_ok(request, data.get("csrf")):
            return pages.error(request, who, 400, "The form expired; reload the page and try again.")
        svc = services(request)
        detail = await q.run_detail(svc.store, who.tenant, run_id)
        if detail is None:
            return pages.error(request, who, 404, f"No run {run_id} in tenant {who.tenant}.")
        key = data.get("step_key", "")
        step = next((s for s in detail.waiting_step_approvals if s.step_key == key), None)
        if step is None:
            return pages.error(request, who, 409, f"Run {run_id} has no approval waiting at {key!r}.")
        group = step.detail.get("group")
        if not who.can("approvals:decide") or not who.in_group(group):
            need = f"the approver role and group {group!r}" if group else "the approver role"
            return pages.error(request, who, 403, f"You may not decide this approval: it needs {need}.")
        approve = data.get("action") == "approve"
        reason = data.get("reason", "").strip() or None
        if not approve and reason is None:
            return pages.error(request, who, 400, "A rejection needs a reason.")
        try:
            await svc.engine.decide(run_id, key, approved=approve, by=who.subject, comment=reason)
        except (ConflictError, NotFoundError, TowerError) as exc:
            return pages.error(request, who, 409, str(exc))
        return RedirectResponse(f"/ui/runs/{run_id}", status_code=303)

    # -- approvals ------------------------------------------------------------------------

    @router.get("/approvals")
    async def approvals_page(request: Request, mine: str | None = None) -> Response:
        who = await signed_in(request)
        if who is None:
            return sess.to_login(request)
        store = services(request).store
        pending, history = await q.approvals_inbox(store, who.tenant)
        steps = await q.waiting_step_approvals(store, who.tenant)
        only_mine = mine == "1"
        if only_mine:
            decides = who.can("approvals:decide")
            pending = [a for a in pending if decides and who.in_group(a.approval_group)]
            steps = [s for s in steps if decides and who.in_group(s.group)]
        return pages.render(
            request, who, "approvals.html", active="approvals", pending=pending, history=history, steps=steps,
            mine=only_mine,
        )  # fmt: skip

    async def approval_view(
        request: Request, who: Principal, approval_id: str, *, http_status: int = 200, **extra: Any
    ) -> Response:
        try:
            appr = await ApprovalBook(services(request).store).get(approval_id, tenant=who.tenant)
        except NotFoundError:
            return pages.error(request, who, 404, f"No approval {approval_id} in tenant {who.tenant}.")
        may = who.can("approvals:decide") and who.in_group(appr.approval_group)
        extra.setdefault("edited", json.dumps(appr.approved_args or appr.args, indent=2, sort_keys=True))
        return pages.render(
            request,
            who,
            "approval.html",
            active="approvals",
            a=appr,
            may_decide=may,
            http_status=http_status,
            **extra,
        )

    @router.get("/approvals/{approval_id}")
    async def approval_page(request: Request, approval_id: str) -> Response:
        who = await signed_in(request)
        if who is None:
            return sess.to_login(request)
        return await approval_view(request, who, approval_id)

    @router.post("/approvals/{approval_id}")
    async def decide(request: Request, approval_id: str) -> Response:
        """Approve, approve with edited arguments, or reject: ``ToolGateway.decide`` + wake the run."""
        who = await signed_in(request)
        if who is None:
            return sess.to_login(request)
        try:
            data = await form(request)
        except InvalidInputError as exc:
            return await approval_view(request, who, approval_id, http_status=400, error=exc.message)
        if not sess.csrf_ok(request, data.get("csrf")):
            return pages.error(request, who, 400, "The form expired; reload the page and try again.")
        action = data.get("action")
        reason = data.get("reason", "").strip() or None
        raw = data.get("args", "")
        if action not in ("approve", "edit", "reject"):
            return await approval_view(
                request, who, approval_id, http_status=400, error="Choose approve or reject."
            )
        if not who.can("approvals:decide"):
            return pages.error(request, who, 403, "Your role may not decide approvals (it needs approver).")
        svc = services(request)
        if svc.gateway is None:
            return pages.error(request, who, 503, "The tool gateway is not running in this server.")
        edited: dict[str, Any] | None = None
        if action == "edit":
            try:
                parsed = json.loads(raw)
            except ValueError as exc:
                msg = f"The edited arguments are not valid JSON: {exc}."
                return await approval_view(request, who, approval_id, http_status=400, error=msg, edited=raw)
            if not isinstance(parsed, dict):
                msg = "The edited arguments must be a JSON object."
                return await approval_view(request, who, approval_id, http_status=400, error=msg, edited=raw)
            edited = parsed
        approver = Approver(who.subject, sess.approver_role(who), tuple(sorted(who.groups)))
        try:
            decided = await svc.gateway.decide(
                approval_id,
                approver=approver,
                approve=action != "reject",
                reason=reason,
                edited_args=edited,
                tenant=who.tenant,
            )
        except NotFoundError:
            return pages.error(request, who, 404, f"No approval {approval_id} in tenant {who.tenant}.")
        except NotAllowedToApprove as exc:
            return pages.error(request, who, 403, exc.message)
        except (InvalidInputError, ConflictError, TowerError) as exc:
            code = 409 if isinstance(exc, ConflictError) else 400
            return await approval_view(
                request, who, approval_id, http_status=code, error=str(exc), edited=raw or None
            )
        if decided.run_id:
            await svc.engine.wake(decided.run_id)
        return RedirectResponse(f"/ui/approvals/{approval_id}", status_code=303)

    # -- workflows ------------------------------------------------------------------------

    @router.get("/workflows")
    async def workflows_page(request: Request) -> Response:
        who = await signed_in(request)
        if who is None:
            return sess.to_login(request)
        found = await q.workflow_summaries(services(request).store, who.tenant)
        return pages.render(request, who, "workflows.html", active="workflows", workflows=found)

    @router.get("/workflows/{name}")
    async def workflow_page(request: Request, name: str, days: str = "14") -> Response:
        who = await signed_in(request)
        if who is None:
            return sess.to_login(request)
        period = min(max(_int(days, 14), 1), 90)
        view = await q.workflow_view(services(request).store, who.tenant, name, days=period)
        if view is None:
            return pages.error(request, who, 404, f"No workflow {name} in tenant {who.tenant}.")
        return pages.render(request, who, "workflow.html", active="workflows", w=view, days=period)

    # -- tools and policies ---------------------------------------------------------------

    @router.get("/tools")
    async def tools_page(request: Request) -> Response:
        who = await signed_in(request)
        if who is None:
            return sess.to_login(request)
        gw = services(request).gateway
        tools = await gw.registry.latest(tenant=who.tenant) if gw is not None else []
        paused = await gw.controls.paused(who.tenant) if gw is not None else []
        return pages.render(
            request, who, "tools.html", active="tools", tools=tools, gateway=gw, paused=paused,
            policies=sorted(gw.policy_texts) if gw is not None else [],
        )  # fmt: skip

    @router.get("/tools/{name}")
    async def tool_page(request: Request, name: str) -> Response:
        who = await signed_in(request)
        if who is None:
            return sess.to_login(request)
        svc = services(request)
        gw = svc.gateway
        if gw is None:
            return pages.error(request, who, 503, "The tool gateway is not running in this server.")
        versions = await gw.registry.versions(name, tenant=who.tenant)
        if not versions:
            return pages.error(request, who, 404, f"No tool {name} in tenant {who.tenant}.")
        from controltower.cli.governance import who_can

        mine = set(await q.workflow_names(svc.store, who.tenant))
        try:
            rows = [row for row in await who_can(svc.engine, gw, name, who.tenant) if row[0] in mine]
            problem = None
        except TowerError as exc:
            rows, problem = [], str(exc)
        return pages.render(
            request, who, "tool.html", active="tools", tool=versions[-1], versions=versions, rows=rows,
            problem=problem,
        )  # fmt: skip

    # -- audit ----------------------------------------------------------------------------

    @router.get("/audit")
    async def audit_page(
        request: Request,
        run_id: str | None = None,
        kind: str | None = None,
        actor: str | None = None,
        workflow: str | None = None,
        after: str = "0",
    ) -> Response:
        who = await signed_in(request)
        if who is None:
            return sess.to_login(request)
        log = AuditLog(services(request).store)
        filters = {"run_id": run_id or None, "kind": kind or None, "actor": actor or None}
        filters["workflow"] = workflow or None
        records = await log.query(
            who.tenant,
            run_id=filters["run_id"],
            kind=filters["kind"],
            actor=filters["actor"],
            workflow=filters["workflow"],
            after_seq=max(0, _int(after, 0)),
            limit=101,
        )
        more = len(records) > 100
        return pages.render(
            request, who, "audit.html", active="audit", records=records[:100], more=more, filters=filters
        )

    @router.get("/audit/verify")
    async def audit_verify(request: Request) -> Response:
        """The chain check walks every record, so the page loads first and asks for it (HTMX)."""
        who = await signed_in(request)
        if who is None:
            return sess.to_login(request)
        verdict = await AuditLog(services(request).store).verify(who.tenant)
        return pages.render(request, who, "_audit_verdict.html", verdict=verdict)

    return router


def _int(text: str, default: int) -> int:
    """A number from the query string; anything else is the default (a link, never an error page)."""
    try:
        return int(text)
    except ValueError:
        return default
