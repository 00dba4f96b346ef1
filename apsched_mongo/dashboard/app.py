"""The dashboard's web application (Starlette): pages, actions and their guards.

Pages are drawn on the server (Jinja2, autoescaping on) and refreshed in place by a small
script that fetches the same URL again every few seconds and swaps its ``<main>``. Every
asset ships in the package; the Content-Security-Policy allows nothing from elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import urlencode
from uuid import UUID, uuid4

import anyio
import attrs
import jinja2
from apscheduler.abc import Serializer
from apscheduler.serializers.pickle import PickleSerializer
from pymongo.errors import ConnectionFailure, PyMongoError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import __version__
from .._client import redact, unreachable
from ..datastore import MongoDBDataStore
from ..errors import ApschedMongoError
from ..eventbroker import MongoDBEventBroker
from . import actions, plot, words
from .guards import (
    MIN_TOKEN_LENGTH,
    SESSION_COOKIE,
    SESSION_LIFETIME,
    SecurityHeaders,
    Sessions,
    read_form,
    safe_next,
    same_origin,
)
from .outcomes import EVENT_TYPES, OutcomeLog
from .queries import COMMANDS_PER_VIEW, PAGE_SIZE, BadRequest, ClusterReader

ACTIONS = ("pause", "resume", "run", "remove", "drop")

logger = logging.getLogger("apsched_mongo.dashboard")


@attrs.frozen
class Settings:
    """How the dashboard reaches the cluster and what it allows.

    :param where: a credential-free description of the server (shown on every page)
    :param uri: the URI, used only to remove its password from error messages
    :param token: required for actions; ``None`` with ``allow_actions`` is refused
    :param allowed_hosts: ``Host`` header values accepted (DNS rebinding protection)
    """

    database: str = "apscheduler"
    collection_prefix: str = "apsched_"
    events_collection: str = "apsched_events"
    serializer: Serializer = attrs.field(factory=PickleSerializer)
    allow_actions: bool = False
    token: str | None = None
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
    refresh_seconds: float = 2.0
    timeout: float = 5.0
    where: str = "?"
    uri: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.allow_actions and (self.token is None or len(self.token) < MIN_TOKEN_LENGTH):
            raise ValueError(f"actions need a token of at least {MIN_TOKEN_LENGTH} characters")


class Dashboard:
    """The state the requests share: the reader, what the broker subscription heard, and
    the link to the cluster (event broker, plus a data store when actions are allowed)."""

    def __init__(self, client: Any, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.reader = ClusterReader(client, settings.database, settings.serializer,
                                    settings.collection_prefix, settings.timeout)
        # releases by an operator's discard_job are not a node's
        self.outcomes = OutcomeLog(ignore_nodes={"", "operator", actions.DROPPED_BY})
        self.store: MongoDBDataStore | None = None
        self.link_error: str | None = "connecting to the cluster's event broker"
        #: set while linked to the cluster (replaced by a fresh event when the link is lost)
        self.linked = anyio.Event()
        self.reachable = True
        self.sessions = Sessions(settings.token if settings.allow_actions else None)

    # --- the link to the cluster ------------------------------------------------------

    async def keep_linked(self) -> None:
        """Start the event broker (and the store for actions); if that fails, say so on the
        pages and try again, with growing pauses, until it works."""
        pause = 1.0
        while True:
            try:
                async with AsyncExitStack() as stack:
                    broker = MongoDBEventBroker(
                        self.client, database=self.settings.database,
                        collection=self.settings.events_collection,
                    )
                    await broker.start(stack, logger)
                    stack.enter_context(broker.subscribe(self.outcomes.record, EVENT_TYPES))
                    if self.settings.allow_actions:
                        store = MongoDBDataStore(
                            self.client, database=self.settings.database,
                            collection_prefix=self.settings.collection_prefix,
                            serializer=self.settings.serializer,
                        )
                        await store.start(stack, broker, logger)
                        self.store = store
                    if self.link_error is not None:
                        logger.info("Listening to the cluster's events (%s mode)",
                                    broker.active_mode)
                    self.link_error = None
                    self.linked.set()
                    pause = 1.0
                    await anyio.sleep_forever()
            except* (PyMongoError, ApschedMongoError, OSError) as failures:
                # (raised inside the broker's task group, so they come grouped)
                message = self._describe(_first(failures))
                if self.link_error != message:
                    logger.warning("Cannot listen to the cluster's events: %s", message)
                self.link_error = message
            finally:
                self.store = None
                if self.linked.is_set():
                    self.linked = anyio.Event()
            await anyio.sleep(pause)
            pause = min(pause * 2, 30.0)

    def _describe(self, exc: BaseException) -> str:
        """One line about a MongoDB failure: no traceback, no topology dump, no password."""
        if isinstance(exc, ConnectionFailure):  # where, how long, the likely cause
            exc = unreachable(exc, self.client, self.settings.uri)
        text = str(exc).split(", Timeout:")[0].split("Topology Description:")[0].strip()
        text = text[:300] or type(exc).__name__
        return redact(text, self.settings.uri) if self.settings.uri else text

    def unreachable(self, exc: PyMongoError) -> str:
        """Note a failed read (logged once per outage) and say what happened."""
        message = self._describe(exc)
        if self.reachable:
            kind = "unreachable" if isinstance(exc, ConnectionFailure) else "refused a read"
            logger.warning("MongoDB %s: %s", kind, message)
        self.reachable = False
        return message

    def reached(self) -> None:
        if not self.reachable:
            logger.info("MongoDB reachable again")
        self.reachable = True


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


# --- rendering ------------------------------------------------------------------------------

_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("apsched_mongo.dashboard", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_templates.filters.update(
    words=words.trigger_in_words, duration=words.duration, count=words.count,
    iso=words.iso, utc=words.utc_text,
)


def _render(dashboard: Dashboard, request: Request, template: str, status: int = 200,
            **context: Any) -> HTMLResponse:
    session = dashboard.sessions.of(request)
    notice = request.query_params.get("notice", "")[:500]
    html = _templates.get_template(template).render(
        request_path=request.url.path,
        here=_here(request),
        settings=dashboard.settings,
        actions=dashboard.settings.allow_actions,
        logged_in=session is not None,
        csrf=dashboard.sessions.csrf_for(session),
        notice=notice,
        link_error=dashboard.link_error,
        version=__version__,
        page_size=PAGE_SIZE,
        commands=COMMANDS_PER_VIEW,
        new_request_id=lambda: str(uuid4()),
        **context,
    )
    return HTMLResponse(html, status_code=status)


def _here(request: Request) -> str:
    """This page's path and query, without the one-off notice (a safe ``next``)."""
    query = [(key, value) for key, value in request.query_params.multi_items()
             if key != "notice"]
    return request.url.path + (f"?{urlencode(query)}" if query else "")


def _cross_site(dashboard: Dashboard, request: Request) -> Response:
    return _problem(dashboard, request, 403, "Refused",
                    "this request came from another site (cross-site request refused)")


async def _posted_form(dashboard: Dashboard, request: Request) -> dict[str, str] | Response:
    """The form of a same-origin POST, or the response refusing it."""
    if not same_origin(request):
        return _cross_site(dashboard, request)
    try:
        return await read_form(request)
    except BadRequest as exc:
        return _problem(dashboard, request, 400, "Bad request", str(exc))


def _problem(dashboard: Dashboard, request: Request, status: int, title: str,
             message: str) -> Response:
    if request.headers.get("authorization"):
        return JSONResponse({"ok": False, "error": message}, status_code=status)
    return _render(dashboard, request, "problem.html", status, page="problem", title=title,
                   message=message)


async def _read(dashboard: Dashboard, request: Request, page: str,
                read: Callable[[], Awaitable[Any]], **context: Any) -> Response:
    """Run a page's reads; a bad parameter gets a 400 page, a MongoDB failure a 503 page
    that keeps refreshing itself until the server answers again."""
    try:
        data = await read()
    except BadRequest as exc:
        return _problem(dashboard, request, 400, "Bad request", str(exc))
    except PyMongoError as exc:
        message = dashboard.unreachable(exc)
        return _render(dashboard, request, "unreachable.html", 503, page=page, message=message)
    dashboard.reached()
    return _render(dashboard, request, f"{page}.html", page=page, data=data, **context)


# --- pages ----------------------------------------------------------------------------------


def _pages(dashboard: Dashboard) -> list[Route]:
    async def overview(request: Request) -> Response:
        async def read() -> dict[str, Any]:
            return {"overview": await dashboard.reader.overview(),
                    "last_seen": dashboard.outcomes.last_seen(),
                    "totals": dashboard.outcomes.totals(),
                    "window_start": dashboard.outcomes.window_start}

        return await _read(dashboard, request, "overview", read)

    async def schedules(request: Request) -> Response:
        params = request.query_params
        search = params.get("q", "").strip()
        return await _read(dashboard, request, "schedules", lambda: dashboard.reader.schedules(
            search, after=params.get("after"), before=params.get("before"),
        ), q=search)

    async def jobs(request: Request) -> Response:
        params = request.query_params
        state: Any = params.get("state", "queued")
        node, after = params.get("node") or None, params.get("after") or None
        schedule = params.get("schedule") or None
        return await _read(dashboard, request, "jobs", lambda: dashboard.reader.jobs(
            state, node=node, after=after, schedule=schedule,
        ), state=state, node=node, after=after, schedule=schedule)

    async def outcomes(request: Request) -> Response:
        log = dashboard.outcomes
        return _render(dashboard, request, "outcomes.html", page="outcomes",
                       plot=plot.build(log.buckets(), log.started_at), totals=log.totals(),
                       by_node=log.by_node(), started_at=log.started_at,
                       window_start=log.window_start)

    async def health(request: Request) -> Response:
        try:
            await dashboard.reader.server_now()
        except PyMongoError as exc:
            return JSONResponse({"mongodb": "unreachable", "error": dashboard.unreachable(exc),
                                 "events": dashboard.link_error or "listening"}, 503)
        dashboard.reached()
        return JSONResponse({"mongodb": "reachable",
                             "events": dashboard.link_error or "listening"})

    return [
        Route("/", overview, name="overview"),
        Route("/schedules", schedules, name="schedules"),
        Route("/jobs", jobs, name="jobs"),
        Route("/outcomes", outcomes, name="outcomes"),
        Route("/health", health, name="health"),
    ]


# --- actions -----------------------------------------------------------------


def _action_routes(dashboard: Dashboard) -> list[Route]:
    async def act(request: Request) -> Response:
        action = request.path_params["action"]
        if not dashboard.settings.allow_actions:
            response = _problem(dashboard, request, 405, "Read-only dashboard",
                                "actions are disabled: this dashboard was started without "
                                "--allow-actions, and nothing was changed")
            response.headers["Allow"] = "GET, HEAD"
            return response
        if action not in ACTIONS:
            return _problem(dashboard, request, 404, "No such action", f"unknown action "
                            f"{action[:40]!r} (one of {', '.join(ACTIONS)})")
        form = await _posted_form(dashboard, request)
        if isinstance(form, Response):
            return form
        refusal = dashboard.sessions.refusal(request, form)
        if refusal:
            return _problem(dashboard, request, 403, "Token required", refusal)
        try:
            message = await _perform(dashboard, action, form)
        except BadRequest as exc:
            return _problem(dashboard, request, 400, "Bad request", str(exc))
        except actions.ActionRefused as exc:
            return _problem(dashboard, request, exc.status, "Not done", str(exc))
        except PyMongoError as exc:
            return _problem(dashboard, request, 503, "MongoDB failed",
                            f"{dashboard.unreachable(exc)} (the action may or may not have "
                            "taken effect: the pages show what is stored once MongoDB "
                            "answers)")
        logger.info("Dashboard action %s: %s", action, message)
        if request.headers.get("authorization"):
            return JSONResponse({"ok": True, "message": message})
        target = safe_next(form.get("next", "/"))
        separator = "&" if "?" in target else "?"
        return RedirectResponse(f"{target}{separator}{urlencode({'notice': message})}", 303)

    async def login_page(request: Request) -> Response:
        return _render(dashboard, request, "login.html", page="login",
                       next=safe_next(request.query_params.get("next", "/")), failed=False)

    async def login(request: Request) -> Response:
        if not dashboard.settings.allow_actions:
            return _problem(dashboard, request, 405, "Read-only dashboard",
                            "actions are disabled, so there is nothing to log in to")
        form = await _posted_form(dashboard, request)
        if isinstance(form, Response):
            return form
        target = safe_next(form.get("next", "/"))
        if not dashboard.sessions.token_matches(form.get("token", "")):
            logger.warning("Dashboard login with a wrong token from %s",
                           request.client.host if request.client else "?")
            return _render(dashboard, request, "login.html", 403, page="login", next=target,
                           failed=True)
        response = RedirectResponse(target, 303)
        response.set_cookie(SESSION_COOKIE, dashboard.sessions.open(), httponly=True,
                            samesite="strict", max_age=int(SESSION_LIFETIME),
                            secure=request.url.scheme == "https")
        return response

    async def logout(request: Request) -> Response:
        if not same_origin(request):
            return _cross_site(dashboard, request)
        session = dashboard.sessions.of(request)
        if session is not None:
            dashboard.sessions.close(session)
        response = RedirectResponse("/", 303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    return [
        Route("/actions/{action}", act, methods=["POST"]),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
    ]


async def _perform(dashboard: Dashboard, action: str, form: dict[str, str]) -> str:
    subject = form.get("id", "")
    if not subject or len(subject) > 1024:
        raise BadRequest("id: missing or longer than 1024 characters")
    store = dashboard.store
    if store is None:
        raise actions.ActionRefused(503, "not connected to the cluster yet "
                                         f"({dashboard.link_error}); nothing was done")
    if action == "drop":
        return await actions.drop(store, _uuid(subject, "id"))
    server_now = await dashboard.reader.server_now()
    if action == "run":
        return await actions.run_now(store, subject, server_now,
                                     _uuid(form.get("request_id", ""), "request_id"))
    perform = {"pause": actions.pause, "resume": actions.resume, "remove": actions.remove}
    return await perform[action](store, subject, server_now)


def _uuid(value: str, name: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise BadRequest(f"{name}: not a UUID: {value[:60]!r}") from None


# --- the application --------------------------------------------------------------------------


def create_app(dashboard: Dashboard) -> Starlette:
    """The ASGI application; the caller runs ``dashboard.keep_linked()`` beside it."""
    static = StaticFiles(packages=[("apsched_mongo.dashboard", "static")])
    return Starlette(
        routes=[*_pages(dashboard), *_action_routes(dashboard),
                Mount("/static", static, name="static")],
        middleware=[
            Middleware(TrustedHostMiddleware, allowed_hosts=list(dashboard.settings.allowed_hosts),
                       www_redirect=False),
            Middleware(SecurityHeaders),
        ],
    )
