"""Alerts out: webhooks get the events they asked for, signed, batched, retried with backoff,
and every delivery's outcome is kept. The first tests drain in this process; the last ones
deliver to a real HTTP receiver through a real Celery worker on Redis, and through the
ticker of an embedded dashboard (no broker)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kombu.pools
import pytest
from celery import Celery
from django.contrib.auth.models import Group, User
from django.core.exceptions import ValidationError
from django.db import connection
from django.db.models import Sum
from django.test import Client
from django.test.utils import CaptureQueriesContext, override_settings
from django.utils import timezone

import protocol
from elections import actions, commands, webhook_delivery, webhooks
from elections.models import Election, Webhook, WebhookDelivery, WebhookEvent
from elections.tasks import alert_leaderless, deliver_webhooks
from tests.helpers import event, free_port, hello, parsed_event
from tests.live import ROOT, LiveDashboard, frame, open_agent
from tests.servers import REDIS_URL

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


# -- a real HTTP receiver -------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    def ids(self) -> list[int]:
        return [e["id"] for e in self.json()["events"]]


@dataclass
class Receiver:
    """Records every POST; answers with ``answers`` in turn, then 200."""

    answers: list[int | tuple[int, dict[str, str]]] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def on(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with lock:
                state.requests.append(
                    Received(self.path, dict(self.headers.items()), body, time.monotonic())
                )
                answer = state.answers.pop(0) if state.answers else 200
            status, headers = answer if isinstance(answer, tuple) else (answer, {})
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"no" if status >= 300 else b"ok")

        do_GET = do_POST  # a followed redirect would come as a GET: recorded too

        def log_message(self, *args: object) -> None:
            pass

    state.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=state.server.serve_forever, daemon=True)
    thread.start()
    yield state
    state.server.shutdown()
    state.server.server_close()


def signed_by(secret: str, request: Received) -> bool:
    """The receiver's check, written from the docs (not with the dashboard's own code)."""
    timestamp = request.headers["X-Electorate-Timestamp"]
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + request.body, hashlib.sha256)
    fresh = abs(time.time() - int(timestamp)) < 60
    return fresh and hmac.compare_digest(
        request.headers["X-Electorate-Signature"], "sha256=" + expected.hexdigest()
    )


# -- the fleet ------------------------------------------------------------------------------


def won(seq: int, election: str, token: int, at: int = 0) -> protocol.Event:
    return parsed_event(seq, election, "leader", token, at=T0 + timedelta(seconds=at))


def hook(url: str, *kinds: str, **extra: Any) -> Webhook:
    return Webhook.objects.create(
        name=extra.pop("name", f"hook-{secrets.token_hex(3)}"), url=url, events=list(kinds), **extra
    )


# -- in this process -----------------------------------------------------------------------


@pytest.mark.django_db
def test_leader_changes_go_out_signed_in_one_batch_and_the_outcome_is_kept(
    receiver: Receiver,
) -> None:
    webhook = hook(receiver.url + "/hook", webhooks.LEADER_CHANGE)
    actions.register_agent(hello("a", "e/1", "e/2", "e/3"))
    actions.ingest_events("a", [won(i + 1, f"e/{i + 1}", 5) for i in range(3)])

    outcome = webhook_delivery.drain(webhook.pk, owner="test")
    assert (outcome.posts, outcome.delivered) == (1, 3)
    [request] = receiver.requests
    assert signed_by(webhook.secret, request)
    assert not signed_by("another secret", request)
    body = request.json()
    assert body["webhook"] == webhook.name
    assert [(e["kind"], e["election"], e["detail"]["leader"]) for e in body["events"]] == [
        ("leader-change", f"e/{i}", "a") for i in (1, 2, 3)
    ]
    assert body["events"][0]["at"] == T0.isoformat()
    delivery = WebhookDelivery.objects.get()
    assert (delivery.ok, delivery.status_code, delivery.attempt, delivery.events) == (
        True,
        200,
        1,
        3,
    )
    assert delivery.duration > 0 and delivery.error == ""
    assert set(WebhookEvent.objects.values_list("delivery", flat=True)) == {delivery.pk}
    # Nothing pending: nothing sent again.
    assert webhook_delivery.drain(webhook.pk, owner="test").posts == 0
    assert len(receiver.requests) == 1


@pytest.mark.django_db
def test_a_webhook_gets_only_the_kinds_it_asked_for(receiver: Receiver) -> None:
    hook(receiver.url + "/wanted", webhooks.LEADER_CHANGE, webhooks.COMMAND)
    hook(receiver.url + "/other-kind", webhooks.SPLIT_BRAIN, webhooks.FLAPPING)
    hook(receiver.url + "/no-kind")
    hook(receiver.url + "/disabled", webhooks.LEADER_CHANGE, enabled=False)
    actions.register_agent(hello("a", "e/1"))
    actions.ingest_events("a", [won(1, "e/1", 1)])

    deliver_webhooks()  # no broker here: the sweep drains in this thread, as the ticker does
    assert [r.path for r in receiver.requests] == ["/wanted"]
    assert set(WebhookEvent.objects.values_list("webhook__name", flat=True)) == {
        Webhook.objects.get(url=receiver.url + "/wanted").name
    }


@pytest.mark.django_db
def test_split_brain_and_command_outcomes_are_events(receiver: Receiver) -> None:
    hook(receiver.url, webhooks.SPLIT_BRAIN, webhooks.COMMAND)
    actions.register_agent(hello("a", "e/1"))
    actions.register_agent(hello("b", "e/1"))
    actions.ingest_events("a", [won(1, "e/1", 1)])
    actions.ingest_events("b", [won(1, "e/1", 2)])

    def claim(agent: str, token: int) -> None:
        state = protocol.ElectionState(state="leader", leader=agent, token=token, ttl_left=5)
        actions.record_heartbeat(agent, protocol.Heartbeat(at=T0, states={"e/1": state}))

    claim("a", 1)
    claim("b", 2)
    claim("a", 1)  # still split: not a second alert
    assert Election.objects.get().status == "split-brain"
    [split] = WebhookEvent.objects.filter(kind="split-brain")
    assert split.detail["claimants"] == ["a", "b"]

    operator = User.objects.create_user("oncall", password="x" * 12)
    operator.groups.add(Group.objects.get(name="operators"))
    operator = User.objects.get(pk=operator.pk)
    actions.agent_disconnected("b")
    command = commands.request_stepdown(
        operator, commands.Request(election="e/1", reason="kernel", force=True)
    )
    assert command.status == "failed"  # the leader b is offline
    [outcome] = WebhookEvent.objects.filter(kind="command")
    assert (outcome.election, outcome.detail["status"], outcome.detail["command"]) == (
        "e/1",
        "failed",
        command.pk,
    )
    deliver_webhooks()
    assert [e["kind"] for e in receiver.requests[0].json()["events"]] == ["split-brain", "command"]


@pytest.mark.django_db
def test_leaderless_longer_than_the_threshold_is_told_once_per_spell(receiver: Receiver) -> None:
    hook(receiver.url, webhooks.LEADERLESS, leaderless_after=30)
    hook(receiver.url + "/patient", webhooks.LEADERLESS, leaderless_after=600)
    actions.register_agent(hello("a", "e/1", "e/2"))
    now = timezone.now()
    Election.objects.filter(name="e/1").update(leaderless_since=now - timedelta(seconds=45))
    Election.objects.filter(name="e/2").update(leaderless_since=now - timedelta(seconds=10))

    assert alert_leaderless() == 1
    [event] = WebhookEvent.objects.all()
    assert (event.kind, event.election, event.detail["threshold"]) == ("leaderless", "e/1", 30)
    assert alert_leaderless() == 0  # the same spell is told once
    # A leader came and went: a new spell, told again.
    Election.objects.filter(name="e/1").update(leaderless_since=now - timedelta(seconds=31))
    assert alert_leaderless() == 1
    # Led elections are not leaderless, however old their last spell.
    Election.objects.filter(name="e/1").update(status="led")
    Election.objects.filter(name="e/1").update(leaderless_since=now - timedelta(seconds=99))
    assert alert_leaderless() == 0


@pytest.mark.django_db
@override_settings(ELECTORATE_WEBHOOK_BACKOFF=2, ELECTORATE_WEBHOOK_BACKOFF_CAP=60)
def test_a_failure_backs_off_doubling_to_a_cap_and_keeps_the_events(receiver: Receiver) -> None:
    assert [webhook_delivery.backoff(n) for n in (1, 2, 3, 4, 5, 6, 20)] == [
        2,
        4,
        8,
        16,
        32,
        60,
        60,
    ]
    receiver.answers = [500, 503]
    webhook = hook(receiver.url, webhooks.LEADER_CHANGE)
    actions.register_agent(hello("a", "e/1"))
    actions.ingest_events("a", [won(1, "e/1", 1)])

    assert webhook_delivery.drain(webhook.pk, owner="task-1").retry_in == 2
    # The lease is held through the backoff: nobody else sends meanwhile...
    assert webhook_delivery.drain(webhook.pk, owner="task-2").busy
    assert webhooks.due() == []
    # ...but the retry of the same task does.
    assert webhook_delivery.drain(webhook.pk, owner="task-1").retry_in == 4
    assert webhook_delivery.drain(webhook.pk, owner="task-1").delivered == 1
    first_try = receiver.requests[0].ids()
    assert len(first_try) == 1 and all(r.ids() == first_try for r in receiver.requests)
    outcomes = list(
        WebhookDelivery.objects.order_by("id").values_list("status_code", "attempt", "ok")
    )
    assert outcomes == [(500, 1, False), (503, 2, False), (200, 3, True)]
    assert "HTTP 500" in WebhookDelivery.objects.order_by("id").first().error
    assert Webhook.objects.get().failures == 0


@pytest.mark.django_db
def test_redirects_are_not_followed_and_only_http_urls_are_called(receiver: Receiver) -> None:
    receiver.answers = [(302, {"Location": receiver.url + "/elsewhere"})]
    webhook = hook(receiver.url + "/", webhooks.LEADER_CHANGE)
    actions.register_agent(hello("a", "e/1"))
    actions.ingest_events("a", [won(1, "e/1", 1)])
    webhook_delivery.drain(webhook.pk, owner="test")
    delivery = WebhookDelivery.objects.get()
    assert (delivery.ok, delivery.status_code) == (False, 302)
    assert "not followed" in delivery.error
    assert [r.path for r in receiver.requests] == ["/"]

    with pytest.raises(ValidationError):
        Webhook(name="ftp", url="ftp://example.com/x", events=["leader-change"]).full_clean()
    with pytest.raises(ValidationError):
        Webhook(name="kinds", url="https://example.com/", events=["typo"]).full_clean()
    # A row written around validation is still refused at send time.
    Webhook.objects.filter(pk=webhook.pk).update(
        url="file:///etc/passwd", busy_until=None, lease_owner=""
    )
    webhook_delivery.drain(webhook.pk, owner="test")
    assert WebhookDelivery.objects.order_by("-id").first().error.startswith("refused")


@pytest.mark.django_db
def test_a_frame_costs_the_same_for_one_change_or_a_hundred_with_webhooks() -> None:
    hook("http://127.0.0.1:9/", webhooks.LEADER_CHANGE)
    hook("http://127.0.0.1:9/b", webhooks.LEADER_CHANGE)
    names = [f"e/{i}" for i in range(100)]
    actions.register_agent(hello("a", *names))
    actions.register_agent(hello("b", *names))
    actions.ingest_events("a", [won(1, "e/0", 1), won(2, "e/1", 1)])

    def statements(call: Any) -> int:
        with CaptureQueriesContext(connection) as queries:
            call()
        return len(queries.captured_queries)

    one = statements(lambda: actions.ingest_events("b", [won(1, "e/0", 2)]))
    many = statements(
        lambda: actions.ingest_events("b", [won(i + 2, n, 3) for i, n in enumerate(names)])
    )
    assert many == one
    assert WebhookEvent.objects.count() == 2 * (2 + 1 + 100)


@pytest.mark.django_db
def test_the_admin_configures_webhooks_and_shows_each_delivery(receiver: Receiver) -> None:
    User.objects.create_superuser("root", password="x" * 12)
    client = Client()
    client.login(username="root", password="x" * 12)
    refused = client.post(
        "/admin/elections/webhook/add/",
        {"name": "bad", "url": "ftp://example.com/", "secret": "s" * 20, "leaderless_after": 30},
    )
    assert refused.status_code == 200 and not Webhook.objects.exists()
    added = client.post(
        "/admin/elections/webhook/add/",
        {
            "name": "pager",
            "url": receiver.url,
            "secret": "s" * 20,
            "events": ["leader-change", "split-brain"],
            "leaderless_after": 30,
            "enabled": "on",
        },
    )
    assert added.status_code == 302
    assert Webhook.objects.get().events == ["leader-change", "split-brain"]
    receiver.answers = [500]
    actions.register_agent(hello("a", "e/1"))
    actions.ingest_events("a", [won(1, "e/1", 1)])
    deliver_webhooks()
    listing = client.get("/admin/elections/webhook/").content.decode()
    assert "HTTP 500" in listing and "leader-change, split-brain" in listing
    deliveries = client.get("/admin/elections/webhookdelivery/").content.decode()
    assert "pager" in deliveries and "500" in deliveries
    # An operator checks the receiver: a test event, whatever the webhook asked for.
    # Saving the webhook (its URL fixed, say) ends the backoff of the failure above.
    assert webhooks.due() == []
    saved = client.post(
        f"/admin/elections/webhook/{Webhook.objects.get().pk}/change/",
        {
            "name": "pager",
            "url": receiver.url + "/fixed",
            "secret": "s" * 20,
            "events": ["leader-change", "split-brain"],
            "leaderless_after": 30,
            "enabled": "on",
        },
    )
    assert saved.status_code == 302
    assert webhooks.due() == [Webhook.objects.get().pk]
    client.post(
        "/admin/elections/webhook/",
        {"action": "send_test", "_selected_action": [Webhook.objects.get().pk]},
    )
    deliver_webhooks()
    assert receiver.requests[-1].path == "/fixed"
    assert [e["kind"] for e in receiver.requests[-1].json()["events"]] == [
        "leader-change",
        "test",
    ]


# -- through a real Celery worker on Redis ---------------------------------------------------


def fresh_connections(app: Celery) -> None:
    """Forget the app's broker connections: the next send connects to the broker now set."""
    kombu.pools.reset()
    app._pool = None
    app.amqp._producer_pool = None


@pytest.fixture
def webhook_worker(django_db_setup: None, tmp_path: Path) -> Iterator[Path]:
    """A real ``celery -A dashboard worker`` on Redis db 13 and a queue of its own, using the
    test database; this process sends to it instead of running tasks in-process. No beat
    (unlike ``tests.live.start_celery``): its sweep would hide a kick that never came."""
    from dashboard.celery import app

    broker = REDIS_URL.rsplit("/", 1)[0] + "/13"
    queue = "webhooks-" + secrets.token_hex(4)
    db = connection.settings_dict
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DEBUG")}
    env.update(
        DATABASE_URL=f"postgresql://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        REDIS_URL=broker,
        SECRET_KEY="test-" + secrets.token_hex(8),
        ELECTORATE_CELERY_QUEUE=queue,
        ELECTORATE_CHANNEL_PREFIX=queue,
        ELECTORATE_TICKER="0",
        ELECTORATE_WEBHOOK_BACKOFF="1",
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "celery.log"
    celery = str(Path(sys.executable).with_name("celery"))
    worker = subprocess.Popen(
        [celery, "-A", "dashboard", "worker", "--pool", "solo", "--queues", queue, "-l", "INFO"],
        cwd=ROOT,
        env=env,
        stdout=open(log, "ab"),  # noqa: SIM115 - owned by the child
        stderr=subprocess.STDOUT,
    )
    saved = {k: app.conf[k] for k in ("task_always_eager", "broker_url", "task_default_queue")}
    app.conf.update(task_always_eager=False, broker_url=broker, task_default_queue=queue)
    fresh_connections(app)
    try:
        deadline = time.monotonic() + 60
        while "ready." not in log.read_text(errors="replace"):
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.2)
        yield log
    finally:
        app.conf.update(saved)
        fresh_connections(app)
        worker.terminate()
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            worker.kill()


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return value


@pytest.mark.live
@pytest.mark.django_db(transaction=True)
def test_a_real_worker_delivers_signed_and_retries_with_backoff(
    webhook_worker: Path, receiver: Receiver
) -> None:
    receiver.answers = [500, 502]
    webhook = hook(receiver.url + "/pager", webhooks.LEADER_CHANGE)
    actions.register_agent(hello("a", "e/1"))
    actions.register_agent(hello("b", "e/1"))
    actions.ingest_events("a", [won(1, "e/1", 1)])  # committed: kicks the worker

    wait_for(lambda: len(receiver.requests) >= 3, 30, "three tries did not arrive")
    first, second, third = receiver.requests
    assert all(signed_by(webhook.secret, r) for r in receiver.requests)
    assert first.ids() == second.ids() == third.ids()
    # Backoff from 1 s (the worker's setting), doubling.
    assert 0.9 <= second.at - first.at < 1.9
    assert 1.9 <= third.at - second.at < 3.5

    def outcomes() -> list[tuple[int, int, bool]]:
        rows = WebhookDelivery.objects.order_by("id").values_list("status_code", "attempt", "ok")
        return list(rows)

    wait_for(lambda: len(outcomes()) == 3, 10, "the outcomes were not stored")
    assert outcomes() == [(500, 1, False), (502, 2, False), (200, 3, True)]
    # A later change goes out as it comes, with nothing sent twice.
    actions.ingest_events("b", [won(1, "e/1", 2, at=1)])
    wait_for(lambda: len(receiver.requests) == 4, 15, "the next change was not delivered")
    [change] = receiver.requests[3].json()["events"]
    assert change["detail"] | {"leaderless_since": None} == {
        "leader": "b",
        "token": 2,
        "previous_leader": "a",
        "previous_token": 1,
        "previous_end_reason": "superseded",
        "leaderless_since": None,
    }
    assert "deliver_webhook" in webhook_worker.read_text()


@pytest.mark.live
@pytest.mark.django_db(transaction=True)
def test_a_burst_of_1000_leader_changes_is_coalesced_into_a_few_requests(
    webhook_worker: Path, receiver: Receiver
) -> None:
    hook(receiver.url + "/pager", webhooks.LEADER_CHANGE)
    names = [f"burst/{i}" for i in range(1000)]
    actions.register_agent(hello("a", *names))
    started = time.monotonic()
    for i in range(0, 1000, 4):  # 250 transactions, each committing four changes
        actions.ingest_events("a", [won(i + k + 1, names[i + k], 1) for k in range(4)])
    burst = time.monotonic() - started

    queued = set(WebhookEvent.objects.values_list("pk", flat=True))
    assert len(queued) == 1000

    def delivered() -> list[int]:
        ids = [i for r in receiver.requests for i in r.ids()]
        return ids if len(ids) >= 1000 else []

    ids = wait_for(delivered, 60, "not every event was delivered")
    time.sleep(1.5)  # anything sent twice would come now
    ids = [i for r in receiver.requests for i in r.ids()]
    assert sorted(ids) == sorted(queued), "every event exactly once"
    posts = len(receiver.requests)
    log = webhook_worker.read_text()
    tasks = len(re.findall(r"Task elections\.tasks\.deliver_webhook\[\S+\] received", log))
    # One request (and one task) per coalescing window (1 s) of the burst at most: 250
    # commits kicked the worker, most of them finding a task already queued.
    assert posts <= burst + 3, (posts, burst)
    assert tasks <= burst + 3, (tasks, burst)
    assert WebhookDelivery.objects.filter(ok=True).count() == posts
    assert WebhookDelivery.objects.aggregate(n=Sum("events"))["n"] == 1000
    print(f"1,000 changes in 250 commits over {burst:.1f} s: {posts} requests, {tasks} tasks")


@pytest.mark.live
async def test_without_a_broker_the_ticker_delivers(
    embedded_dashboard: LiveDashboard, receiver: Receiver
) -> None:
    """Embedded mode (the demo): no Celery worker, the server's ticker drains the outbox."""
    dashboard = embedded_dashboard
    name = f"ticker-{secrets.token_hex(3)}"
    secret = dashboard.manage(
        "shell",
        "-c",
        "from elections.models import Webhook; "
        f"print(Webhook.objects.create(name={name!r}, url={receiver.url + '/' + name!r}, "
        "events=['leader-change']).secret)",
    ).split()[-1]
    try:
        ws = await open_agent(dashboard, name, [f"{name}/db"])
        assert (await frame(ws))["type"] == "ack"
        await ws.send(json.dumps({"type": "events", "items": [event(1, f"{name}/db", token=3)]}))
        assert (await frame(ws))["type"] == "ack"
        deadline = time.monotonic() + 15
        while not receiver.on("/" + name):
            assert time.monotonic() < deadline, dashboard.log()
            await asyncio.sleep(0.1)
        [request] = receiver.on("/" + name)
        assert signed_by(secret, request)
        assert [(e["election"], e["detail"]["leader"]) for e in request.json()["events"]] == [
            (f"{name}/db", name)
        ]
        await ws.close()
    finally:
        dashboard.manage(
            "shell",
            "-c",
            "from elections.models import Webhook; "
            f"Webhook.objects.filter(name={name!r}).update(enabled=False)",
        )
