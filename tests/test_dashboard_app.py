"""The dashboard's pages and actions over HTTP (in process, through httpx's ASGI transport):
escaping, the token and CSRF guards, read-only mode, actions reaching the cluster, bad
input and an unreachable server."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import anyio
import anyio.lowlevel
import httpx
import pytest
from apscheduler import (
    ConflictPolicy,
    Job,
    JobAdded,
    JobOutcome,
    JobReleased,
    JobResult,
    Schedule,
    ScheduleRemoved,
    ScheduleUpdated,
    Task,
)
from apscheduler.triggers.interval import IntervalTrigger

from apsched_mongo import MongoDBDataStore
from apsched_mongo._client import describe_hosts
from apsched_mongo.dashboard.app import Dashboard, Settings, create_app
from tests.broker_helpers import Inbox, StartNode, node_starter
from tests.conftest import Backend
from tests.dashboard_support import LEASE, CountingClient, snapshot

pytestmark = pytest.mark.anyio

TOKEN = "test-token-0123456789abcdef"
SITE = "http://127.0.0.1:8800"
SAME_ORIGIN = {"Origin": SITE}
EVIL = '<script>alert("{}")</script>'
Open = Callable[..., Awaitable[tuple[Dashboard, httpx.AsyncClient]]]


@pytest.fixture
async def open_dashboard(backend: Backend) -> AsyncIterator[Open]:
    """``dashboard, http = await open_dashboard(allow_actions=..., client=...)``"""
    async with AsyncExitStack() as stack:
        # The task group is entered now, not when a test opens a dashboard: fixtures are
        # torn down in reverse order of setup, and task groups must exit in that order too
        tasks = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tasks.cancel_scope.cancel)

        async def open_(*, allow_actions: bool = False, client: Any = None,
                        wait_for_link: bool = True) -> tuple[Dashboard, httpx.AsyncClient]:
            settings = Settings(database=backend.database, allow_actions=allow_actions,
                                token=TOKEN if allow_actions else None, where="test server")
            dashboard = Dashboard(client or backend.client(), settings)
            tasks.start_soon(dashboard.keep_linked)
            if wait_for_link:
                with anyio.fail_after(10):
                    await dashboard.linked.wait()
            http = await stack.enter_async_context(httpx.AsyncClient(
                transport=httpx.ASGITransport(app=create_app(dashboard)), base_url=SITE))
            return dashboard, http

        yield open_


def start_broker(backend: Backend) -> AbstractAsyncContextManager[StartNode]:
    """Brokers on the test database, polling often enough for a test's patience."""
    return node_starter(backend.client, database=backend.database, poll_interval=0.05)


@pytest.fixture
async def node(backend: Backend) -> AsyncIterator[MongoDBDataStore]:
    """A scheduler node's store (with a local broker) to set up and inspect state."""
    async with start_broker(backend) as start, AsyncExitStack() as stack:
        broker = (await start()).broker
        store = backend.store()
        await store.start(stack, broker, logging.getLogger(__name__))
        await store.add_task(Task(id="work", func="tests.helpers:noop", job_executor="async"))
        yield store


async def add_schedule(store: MongoDBDataStore, schedule_id: str = "nightly",
                       task_id: str = "work", **kwargs: Any) -> Schedule:
    schedule = Schedule(id=schedule_id, task_id=task_id, trigger=IntervalTrigger(hours=1),
                        job_executor="async",
                        next_fire_time=datetime.now(UTC) + timedelta(hours=1), **kwargs)
    await store.add_schedule(schedule, ConflictPolicy.exception)
    return schedule


async def add_job(store: MongoDBDataStore, *args: Any, task_id: str = "work") -> Job:
    job = Job(task_id=task_id, executor="async", args=args)
    await store.add_job(job)
    return job


async def log_in(http: httpx.AsyncClient) -> None:
    response = await http.post("/login", data={"token": TOKEN, "next": "/"},
                               headers=SAME_ORIGIN)
    assert response.status_code == 303, response.text


async def csrf_of(http: httpx.AsyncClient, page: str = "/schedules") -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]*)"', (await http.get(page)).text)
    assert match, "no action form on the page"
    return match.group(1)


@pytest.fixture
async def other_node(backend: Backend) -> AsyncIterator[Inbox]:
    """What another node's MongoDB broker receives: proof an action reached the cluster."""
    async with start_broker(backend) as start:
        yield (await start()).inbox


# --- pages ------------------------------------------------------------------------------------


async def test_every_page_renders(open_dashboard: Open, node: MongoDBDataStore) -> None:
    await add_schedule(node)
    await add_job(node, 42)
    _, http = await open_dashboard()
    for path, expected in [("/", "active schedules"), ("/schedules", "every 1 h"),
                           ("/jobs", "42"), ("/jobs?state=running", "No running jobs"),
                           ("/outcomes", "Jobs released per minute"),
                           ("/static/dashboard.js", "localize"),
                           ("/static/dashboard.css", "--accent")]:
        response = await http.get(path)
        assert response.status_code == 200, path
        assert expected in response.text, path


async def test_security_headers(open_dashboard: Open) -> None:
    _, http = await open_dashboard()
    headers = (await http.get("/")).headers
    assert "default-src 'none'" in headers["content-security-policy"]
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"


async def test_foreign_host_header_refused(open_dashboard: Open) -> None:
    """DNS rebinding: a page on another site resolving its name to 127.0.0.1 gets nothing."""
    _, http = await open_dashboard()
    response = await http.get("/", headers={"Host": "attacker.example"})
    assert response.status_code == 400
    assert "schedules" not in response.text


async def test_database_values_are_escaped(
    open_dashboard: Open, node: MongoDBDataStore, backend: Backend,
) -> None:
    task_id, schedule_id, argument, scheduler = (EVIL.format(what) for what in
                                                 ("task", "schedule", "argument", "node"))
    await node.add_task(Task(id=task_id, func="tests.helpers:noop", job_executor="async"))
    await add_schedule(node, schedule_id, task_id)
    await add_job(node, argument, task_id=task_id)
    dashboard, http = await open_dashboard(allow_actions=True)
    await log_in(http)
    running = await add_job(node, argument, task_id=task_id)
    [acquired] = [job for job in await node.acquire_jobs(scheduler, LEASE, 10)
                  if job.id == running.id] or [None]
    assert acquired is not None
    await node.release_job(scheduler, acquired, JobResult.from_job(
        acquired, JobOutcome.success, finished_at=datetime.now(UTC)))
    with anyio.fail_after(10):  # the dashboard hears the release through the broker
        while not dashboard.outcomes.by_node():
            await dashboard.outcomes.next_event()

    for path in ("/", "/schedules", "/jobs?state=queued", "/jobs?state=running",
                 "/outcomes", f"/schedules?q={schedule_id}"):
        html = (await http.get(path)).text
        assert "<script>alert" not in html, path
    pages = " ".join([(await http.get(path)).text
                      for path in ("/", "/schedules", "/jobs?state=running", "/outcomes")])
    for what in ("task", "schedule", "argument", "node"):
        assert f"&lt;script&gt;alert(&#34;{what}&#34;)&lt;/script&gt;" in pages, what


async def test_live_refresh_script_and_clock_are_on_every_page(open_dashboard: Open) -> None:
    _, http = await open_dashboard()
    for path in ("/", "/schedules", "/jobs"):
        html = (await http.get(path)).text
        assert '<script src="/static/dashboard.js" defer></script>' in html
        assert 'id="live"' in html and "data-now=" in html


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "message"), [
    ("/jobs?state=finished", "state must be &#39;queued&#39; or &#39;running&#39;"),
    ("/jobs?after=xyz", "after: not a job cursor"),
    ("/schedules?q=" + "x" * 300, "search text longer than 200 characters"),
])
async def test_bad_parameters_get_a_clear_400(open_dashboard: Open, path: str,
                                              message: str) -> None:
    _, http = await open_dashboard()
    response = await http.get(path)
    assert response.status_code == 400
    assert message in response.text
    assert "Traceback" not in response.text


# --- read-only mode ---------------------------------------------------------------------------


async def test_read_only_refuses_every_action_and_changes_nothing(
    open_dashboard: Open, node: MongoDBDataStore, backend: Backend,
) -> None:
    await add_schedule(node)
    job = await add_job(node)
    _, http = await open_dashboard(allow_actions=False)
    before = await snapshot(backend.db())
    for action, subject in [("pause", "nightly"), ("resume", "nightly"), ("run", "nightly"),
                            ("remove", "nightly"), ("drop", str(job.id))]:
        for headers in (SAME_ORIGIN, {"Authorization": f"Bearer {TOKEN}"}):
            response = await http.post(f"/actions/{action}", headers=headers, data={
                "id": subject, "request_id": str(uuid4())})
            assert response.status_code == 405, (action, response.text)
    assert (await http.post("/login", data={"token": TOKEN}, headers=SAME_ORIGIN)
            ).status_code == 405
    assert 'action="/actions/' not in (await http.get("/schedules")).text
    assert await snapshot(backend.db()) == before


# --- guards -----------------------------------------------------------------------------------


async def test_actions_need_the_token(open_dashboard: Open, node: MongoDBDataStore,
                                      backend: Backend) -> None:
    await add_schedule(node)
    _, http = await open_dashboard(allow_actions=True)
    before = await snapshot(backend.db())
    form = {"id": "nightly", "csrf": "", "next": "/schedules"}
    refused = [
        await http.post("/actions/pause", data=form, headers=SAME_ORIGIN),
        await http.post("/actions/pause", data=form,
                        headers={"Authorization": "Bearer wrong-token-0123456789"}),
        await http.post("/actions/pause", data=form, headers={"Authorization": TOKEN}),
    ]
    assert [response.status_code for response in refused] == [403, 403, 403]
    assert "log in first" in refused[0].text
    login = await http.post("/login", data={"token": "wrong"}, headers=SAME_ORIGIN)
    assert login.status_code == 403 and "Wrong token" in login.text
    assert await snapshot(backend.db()) == before


async def test_session_needs_csrf_token_and_same_origin(
    open_dashboard: Open, node: MongoDBDataStore, backend: Backend,
) -> None:
    await add_schedule(node)
    _, http = await open_dashboard(allow_actions=True)
    await log_in(http)
    csrf = await csrf_of(http)
    before = await snapshot(backend.db())
    no_csrf = await http.post("/actions/pause", data={"id": "nightly"}, headers=SAME_ORIGIN)
    wrong_csrf = await http.post("/actions/pause", data={"id": "nightly", "csrf": "0" * 64},
                                 headers=SAME_ORIGIN)
    cross_site = await http.post("/actions/pause", data={"id": "nightly", "csrf": csrf},
                                 headers={"Origin": "http://attacker.example"})
    fetch_cross = await http.post("/actions/pause", data={"id": "nightly", "csrf": csrf},
                                  headers={"Sec-Fetch-Site": "cross-site"})
    assert [r.status_code for r in (no_csrf, wrong_csrf, cross_site, fetch_cross)] == [
        403, 403, 403, 403]
    assert "CSRF" in no_csrf.text and "another site" in cross_site.text
    assert await snapshot(backend.db()) == before

    done = await http.post("/actions/pause", headers=SAME_ORIGIN,
                           data={"id": "nightly", "csrf": csrf, "next": "/schedules?q=n"})
    assert done.status_code == 303
    assert done.headers["location"].startswith("/schedules?q=n&notice=paused+schedule")
    assert (await node.get_schedules({"nightly"}))[0].paused


async def test_redirect_stays_on_this_site(open_dashboard: Open,
                                           node: MongoDBDataStore) -> None:
    await add_schedule(node)
    _, http = await open_dashboard(allow_actions=True)
    await log_in(http)
    csrf = await csrf_of(http)
    for target in ("https://attacker.example/", "//attacker.example/x", "/\\attacker"):
        response = await http.post("/actions/pause", headers=SAME_ORIGIN,
                                   data={"id": "nightly", "csrf": csrf, "next": target})
        assert response.status_code == 303
        assert response.headers["location"].startswith("/?notice=")


async def test_logout_ends_the_session(open_dashboard: Open, node: MongoDBDataStore) -> None:
    await add_schedule(node)
    _, http = await open_dashboard(allow_actions=True)
    await log_in(http)
    csrf = await csrf_of(http)
    assert (await http.post("/logout", headers=SAME_ORIGIN)).status_code == 303
    response = await http.post("/actions/pause", headers=SAME_ORIGIN,
                               data={"id": "nightly", "csrf": csrf})
    assert response.status_code == 403


# --- actions reach the cluster ----------------------------------------------------------------


async def test_pause_and_resume(open_dashboard: Open, node: MongoDBDataStore,
                                other_node: Inbox) -> None:
    schedule = await add_schedule(node)
    _, http = await open_dashboard(allow_actions=True)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    response = await http.post("/actions/pause", data={"id": "nightly"}, headers=bearer)
    assert response.json() == {"ok": True, "message": "paused schedule 'nightly'"}
    stored = (await node.get_schedules({"nightly"}))[0]
    assert stored.paused and stored.next_fire_time == schedule.next_fire_time
    await other_node.wait_for_event(ScheduleUpdated, schedule_id="nightly")

    again = await http.post("/actions/pause", data={"id": "nightly"}, headers=bearer)
    assert again.json()["message"] == "schedule 'nightly' was already paused"

    response = await http.post("/actions/resume", data={"id": "nightly"}, headers=bearer)
    assert response.json()["message"] == "resumed schedule 'nightly'"
    assert not (await node.get_schedules({"nightly"}))[0].paused


async def test_pause_refused_while_a_node_holds_the_schedule(
    open_dashboard: Open, node: MongoDBDataStore, backend: Backend,
) -> None:
    """Replacing a leased schedule would drop the lease and the holder's progress update,
    so the same fire time could fire twice."""
    schedule = Schedule(id="due", task_id="work", trigger=IntervalTrigger(hours=1),
                        job_executor="async",
                        next_fire_time=datetime.now(UTC) - timedelta(seconds=1))
    await node.add_schedule(schedule, ConflictPolicy.exception)
    assert [s.id for s in await node.acquire_schedules("node-1", LEASE, 1)] == ["due"]
    _, http = await open_dashboard(allow_actions=True)
    before = await snapshot(backend.db())
    response = await http.post("/actions/pause", data={"id": "due"},
                               headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 409
    assert "being processed by 'node-1'" in response.json()["error"]
    assert await snapshot(backend.db()) == before


async def test_run_now_queues_one_extra_job_once(open_dashboard: Open, node: MongoDBDataStore,
                                                 other_node: Inbox) -> None:
    schedule = await add_schedule(node, args=(1, 2), kwargs={"x": "y"})
    _, http = await open_dashboard(allow_actions=True)
    await log_in(http)
    form = {"id": "nightly", "csrf": await csrf_of(http), "request_id": str(uuid4())}
    first = await http.post("/actions/run", data=form, headers=SAME_ORIGIN)
    second = await http.post("/actions/run", data=form, headers=SAME_ORIGIN)  # sent twice
    assert (first.status_code, second.status_code) == (303, 303)
    assert "already+queued" in second.headers["location"]
    [job] = await node.get_jobs()
    assert str(job.id) == form["request_id"]
    assert (job.task_id, job.schedule_id, job.args, job.kwargs) == ("work", "nightly", (1, 2),
                                                                   {"x": "y"})
    assert job.scheduled_fire_time is None
    # the schedule's own fire times are untouched
    stored = (await node.get_schedules({"nightly"}))[0]
    assert stored.next_fire_time == schedule.next_fire_time
    await other_node.wait_for_event(JobAdded, job_id=job.id)
    # the schedule's jobs, on the jobs page
    await add_schedule(node, "other")
    await add_job(node, "unrelated")
    of_schedule = (await http.get("/jobs?schedule=nightly")).text
    assert str(job.id)[:8] in of_schedule and "Queued (1)" in of_schedule
    assert "No queued jobs of schedule" in (await http.get("/jobs?schedule=other")).text
    assert "Queued (2)" in (await http.get("/jobs")).text


async def test_remove(open_dashboard: Open, node: MongoDBDataStore, other_node: Inbox) -> None:
    await add_schedule(node)
    _, http = await open_dashboard(allow_actions=True)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    response = await http.post("/actions/remove", data={"id": "nightly"}, headers=bearer)
    assert response.json()["message"] == "removed schedule 'nightly'"
    assert await node.get_schedules() == []
    await other_node.wait_for_event(ScheduleRemoved, schedule_id="nightly")
    gone = await http.post("/actions/remove", data={"id": "nightly"}, headers=bearer)
    assert gone.status_code == 404 and "no schedule 'nightly'" in gone.json()["error"]


async def test_drop_only_a_queued_job(open_dashboard: Open, node: MongoDBDataStore,
                                      other_node: Inbox) -> None:
    queued, claimed = await add_job(node, "a"), await add_job(node, "b")
    _, http = await open_dashboard(allow_actions=True)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    response = await http.post("/actions/drop", data={"id": str(queued.id)}, headers=bearer)
    assert response.json()["ok"] is True
    released = await other_node.wait_for_event(JobReleased, job_id=queued.id)
    assert released.outcome is JobOutcome.cancelled

    [running] = await node.acquire_jobs("node-1", LEASE, 1)
    assert running.id == claimed.id
    refused = await http.post("/actions/drop", data={"id": str(claimed.id)}, headers=bearer)
    assert refused.status_code == 409 and "no longer queued" in refused.json()["error"]
    assert [job.id for job in await node.get_jobs()] == [claimed.id]


@pytest.mark.parametrize(("action", "form", "message"), [
    ("drop", {"id": "not-a-uuid"}, "id: not a UUID"),
    ("run", {"id": "nightly", "request_id": "x"}, "request_id: not a UUID"),
    ("pause", {}, "id: missing"),
    ("explode", {"id": "nightly"}, "unknown action"),
])
async def test_bad_action_input(open_dashboard: Open, node: MongoDBDataStore, backend: Backend,
                                action: str, form: dict[str, str], message: str) -> None:
    await add_schedule(node)
    _, http = await open_dashboard(allow_actions=True)
    before = await snapshot(backend.db())
    response = await http.post(f"/actions/{action}", data=form,
                               headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code in (400, 404)
    assert message in response.json()["error"]
    assert await snapshot(backend.db()) == before


# --- an unreachable server --------------------------------------------------------------------


async def test_unreachable_server_then_recovery(
    open_dashboard: Open, node: MongoDBDataStore, backend: Backend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await add_schedule(node)
    client = CountingClient(backend.client())
    _, http = await open_dashboard(client=client)
    caplog.set_level(logging.INFO, logger="apsched_mongo.dashboard")
    client.down = True
    # "memory" for the in-memory client, the hosts for a driver's client
    where = describe_hosts(backend.client())
    for path in ("/", "/schedules", "/jobs", "/"):
        response = await http.get(path)
        assert response.status_code == 503, path
        assert "MongoDB is not answering" in response.text
        assert f"cannot reach MongoDB at {where} within 5.0 s: connection refused" in (
            response.text)
        assert "Topology Description" not in response.text
        assert 'id="live"' in response.text  # the script keeps refreshing this page
    assert (await http.get("/health")).json()["mongodb"] == "unreachable"
    # One line per outage from the pages (the broker's own retries are its business)
    outage = [r for r in caplog.records if r.getMessage().startswith("MongoDB unreachable")]
    assert len(outage) == 1, [r.getMessage() for r in caplog.records]
    assert outage[0].levelno == logging.WARNING
    assert outage[0].getMessage().startswith(
        f"MongoDB unreachable: cannot reach MongoDB at {where} within 5.0 s: connection refused")
    assert not [r for r in caplog.records if r.exc_info], "no traceback"

    client.down = False
    response = await http.get("/")
    assert response.status_code == 200 and "active schedules" in response.text
    assert any(r.getMessage() == "MongoDB reachable again" for r in caplog.records)


async def test_unreachable_at_start_links_later(
    open_dashboard: Open, backend: Backend, node: MongoDBDataStore,
) -> None:
    """Started while the server is down, the dashboard links up once it answers."""
    await add_schedule(node)
    client = CountingClient(backend.client())
    client.down = True
    dashboard, http = await open_dashboard(client=client, wait_for_link=False,
                                           allow_actions=True)
    connecting = dashboard.link_error
    with anyio.fail_after(10):
        await client.refused.wait()  # the link's first attempt is failing
        while dashboard.link_error == connecting:
            await anyio.lowlevel.checkpoint()
    response = await http.get("/")
    assert response.status_code == 503
    assert dashboard.link_error is not None
    assert "cannot reach MongoDB" in dashboard.link_error, dashboard.link_error
    assert "connection refused" in (await http.get("/outcomes")).text
    refused = await http.post("/actions/pause", data={"id": "nightly"},
                              headers={"Authorization": f"Bearer {TOKEN}"})
    assert refused.status_code == 503 and "not connected" in refused.json()["error"]
    client.down = False
    with anyio.fail_after(15):
        await dashboard.linked.wait()
    assert (await http.get("/")).status_code == 200
    done = await http.post("/actions/pause", data={"id": "nightly"},
                           headers={"Authorization": f"Bearer {TOKEN}"})
    assert done.json()["ok"] is True
