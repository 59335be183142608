"""Real dashboard server processes for end-to-end tests (``manage.py runserver``, daphne).

Embedded mode: a fresh SQLite file and the in-memory channel layer, as ``make demo`` runs.
Production mode: a fresh PostgreSQL database and the Redis channel layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psycopg
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.helpers import free_port
from tests.servers import PG_DSN, REDIS_URL, wait_tcp

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LiveDashboard:
    url: str
    env: dict[str, str]
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    cleanup: list[object] = field(default_factory=list)
    #: Further processes of this dashboard (another server, the Celery worker).
    others: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def ws_agent(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws/agent/"

    def manage(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise AssertionError(f"manage.py {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout

    def shell(self, code: str) -> str:
        """Run ``code`` in ``manage.py shell``: the last line it printed ("" when none)."""
        lines = self.manage("shell", "-c", code).strip().splitlines()
        return lines[-1] if lines else ""

    def token(self, agent_id: str) -> str:
        return self.manage("create_agent_token", agent_id).strip()

    def tokens(self, agent_ids: list[str]) -> dict[str, str]:
        """Tokens for many agents in one process start (``token`` costs one each)."""
        out = self.shell(
            "import json; from elections import actions; "
            f"print(json.dumps({{a: actions.issue_agent_token(a) for a in {agent_ids!r}}}))",
        )
        return json.loads(out)

    def get_json(self, path: str, session: str | None = None) -> object:
        request = urllib.request.Request(self.url + path)
        if session:
            request.add_header("Cookie", f"sessionid={session}")
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def log(self) -> str:
        path = self.workdir / "server.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""

    def serve(self, port: int, log: str = "server.log") -> subprocess.Popen[bytes]:
        """Start one more server process of this dashboard (same database and Redis)."""
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
            cwd=ROOT,
            env=self.env,
            stdout=open(self.workdir / log, "ab"),  # noqa: SIM115 - owned by the child
            stderr=subprocess.STDOUT,
        )
        wait_tcp("127.0.0.1", port, proc, "the dashboard", timeout=30)
        return proc

    def another_process(self) -> LiveDashboard:
        """A second server process of the same dashboard, on a port of its own."""
        port = free_port()
        proc = self.serve(port, log=f"server-{port}.log")
        self.others.append(proc)
        return LiveDashboard(f"http://127.0.0.1:{port}", self.env, self.workdir, proc)

    def stop(self) -> None:
        for proc in [p for p in (self.proc, *self.others) if p is not None]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [p for p in (self.proc, *self.others) if p is not None]:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_dashboard(
    workdir: Path,
    *,
    production: bool,
    extra_env: dict[str, str] | None = None,
    database_server: str = PG_DSN,
) -> LiveDashboard:
    """A dashboard server process; in production mode its fresh database is created on
    ``database_server`` (the shared PostgreSQL unless a test brings its own)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "DEBUG")}
    env.update(
        PYTHONUNBUFFERED="1",
        ELECTORATE_DATA_DIR=str(workdir),
        SECRET_KEY="test-" + secrets.token_hex(8),
        ELECTORATE_AGENT_STALE_AFTER="5",
        ELECTORATE_LIVE_COALESCE="0.05",
        ELECTORATE_HTTPS="0",  # plain HTTP on loopback: no secure cookies, no redirect
    )
    dashboard = LiveDashboard(url=f"http://127.0.0.1:{port}", env=env, workdir=workdir)
    if production:
        name = "electorate_live_" + secrets.token_hex(4)
        with psycopg.connect(database_server, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        base = database_server.rsplit("/", 1)[0]
        env["DATABASE_URL"] = f"{base}/{name}"
        env["REDIS_URL"] = REDIS_URL.rsplit("/", 1)[0] + "/13"
        env["ELECTORATE_CHANNEL_PREFIX"] = name
        # As in production: periodic work runs in a Celery worker with beat, on a queue of
        # this dashboard's own (other test sessions share the Redis).
        env["ELECTORATE_TICKER"] = "0"
        env["ELECTORATE_CELERY_QUEUE"] = name

        def drop() -> None:
            with psycopg.connect(database_server, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

        dashboard.cleanup.append(drop)
    else:
        env["DATABASE_URL"] = f"sqlite:///{workdir / 'dashboard.sqlite3'}"
    env.update(extra_env or {})
    dashboard.manage("migrate", "--verbosity", "0")
    dashboard.proc = dashboard.serve(port)
    if production:
        dashboard.others.append(start_celery(dashboard))
    return dashboard


def start_celery(dashboard: LiveDashboard) -> subprocess.Popen[bytes]:
    """A Celery worker with an embedded beat on the dashboard's Redis and queue."""
    celery = Path(sys.executable).with_name("celery")
    return subprocess.Popen(
        [
            str(celery),
            "-A",
            "dashboard",
            "worker",
            "--beat",
            "--schedule",
            str(dashboard.workdir / "beat-schedule"),
            "--pool",
            "solo",
            "--loglevel",
            "INFO",
        ],
        cwd=ROOT,
        env=dashboard.env,
        stdout=open(dashboard.workdir / "celery.log", "ab"),
        stderr=subprocess.STDOUT,
    )


def create_user(dashboard: LiveDashboard, username: str, password: str) -> None:
    dashboard.shell(
        "from django.contrib.auth import get_user_model as g; "
        f"u, _ = g().objects.get_or_create(username={username!r}); "
        f"u.set_password({password!r}); u.is_superuser = True; u.is_staff = True; u.save()",
    )


def log_in(dashboard: LiveDashboard, username: str, password: str) -> str:
    """Sign in through the login form as a browser would; return the session cookie."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(dashboard.url + "/login/", timeout=10).read()
    csrf = next(c.value for c in jar if c.name == "csrftoken")
    form = urllib.parse.urlencode(
        {"username": username, "password": password, "csrfmiddlewaretoken": csrf}
    ).encode()
    request = urllib.request.Request(
        dashboard.url + "/login/", data=form, headers={"Referer": dashboard.url + "/login/"}
    )
    opener.open(request, timeout=10).read()
    session = next((c.value for c in jar if c.name == "sessionid"), None)
    if session is None:
        raise AssertionError(f"could not log in as {username!r}")
    return session


def api_response(
    dashboard: Any, token: str, method: str, path: str, body: Any = None
) -> tuple[int, bytes]:
    """A JSON API call to ``dashboard`` (anything with a ``url``) with a bearer token: the
    HTTP status and the body, an error's as much as a success's."""
    request = urllib.request.Request(
        dashboard.url + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def api(dashboard: Any, token: str, method: str, path: str, body: Any = None) -> Any:
    """``api_response``'s JSON. An HTTP error answers ``{"status": code, **its JSON body}``
    rather than raising."""
    status, raw = api_response(dashboard, token, method, path, body)
    if status < 400:
        return json.loads(raw)
    text = raw.decode(errors="replace")
    try:
        return {"status": status, **json.loads(text)}
    except ValueError:
        return {"status": status, "error": text}


def log_out(dashboard: LiveDashboard, session: str) -> None:
    """Sign out through the logout form, as the page's button does."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    host = urllib.parse.urlsplit(dashboard.url).hostname or "127.0.0.1"
    jar.set_cookie(
        http.cookiejar.Cookie(
            0,
            "sessionid",
            session,
            None,
            False,
            host,
            False,
            False,
            "/",
            True,
            False,
            None,
            False,
            None,
            None,
            {},
        )
    )
    opener.open(dashboard.url + "/login/", timeout=10).read()
    csrf = next(c.value for c in jar if c.name == "csrftoken")
    request = urllib.request.Request(
        dashboard.url + "/logout/",
        data=urllib.parse.urlencode({"csrfmiddlewaretoken": csrf}).encode(),
        headers={"Referer": dashboard.url + "/"},
    )
    opener.open(request, timeout=10).read()


async def open_live(dashboard: LiveDashboard, session: str, query: str = "") -> ClientConnection:
    """The browser's live websocket (``/ws/live/``), with the session cookie and an Origin."""
    return await connect(
        dashboard.url.replace("http://", "ws://") + "/ws/live/" + (f"?{query}" if query else ""),
        additional_headers={"Cookie": f"sessionid={session}", "Origin": dashboard.url},
        max_size=None,
    )


@contextlib.contextmanager
def demo_fleet(dashboard: LiveDashboard, directory: Path) -> Iterator[dict[str, subprocess.Popen]]:
    """The demo's three raft agents, as real processes, reporting to ``dashboard``."""
    from demo import fleet as demo

    tokens = {a: dashboard.token(a) for a in demo.AGENTS}
    ports = [free_port() for _ in range(len(demo.AGENTS) * 4)]
    agents = demo.write_fleet(directory, dashboard.ws_agent, tokens, ports)
    procs = {a.id: demo.start_agent(a, directory / f"{a.id}.log") for a in agents}
    try:
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="session")
def embedded_dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDashboard]:
    dashboard = start_dashboard(tmp_path_factory.mktemp("embedded"), production=False)
    yield dashboard
    dashboard.stop()


@contextlib.contextmanager
def production(workdir: Path, **kwargs: Any) -> Iterator[LiveDashboard]:
    """A production-mode dashboard (PostgreSQL, Redis channel layer; more ``start_dashboard``
    arguments in ``kwargs``) with a database of its own, stopped and its database dropped when
    the block ends."""
    dashboard = start_dashboard(workdir, production=True, **kwargs)
    yield dashboard
    dashboard.stop()
    time.sleep(0.2)
    for step in dashboard.cleanup:
        step()  # type: ignore[operator]


def own_production_dashboard(name: str, scope: Literal["module", "session"]) -> Any:
    """A fixture called ``name``: a ``production`` dashboard for the ``scope``."""

    @pytest.fixture(scope=scope, name=name)
    def fixture(
        tmp_path_factory: pytest.TempPathFactory, pg_dsn: str, redis_url: str
    ) -> Iterator[LiveDashboard]:
        """A production-mode dashboard with a database of its own."""
        with production(tmp_path_factory.mktemp(name)) as dashboard:
            yield dashboard

    return fixture


production_dashboard = own_production_dashboard("production_dashboard", "session")


@pytest.fixture(scope="session", params=["embedded", "production"])
def dashboard(request: pytest.FixtureRequest) -> LiveDashboard:
    return request.getfixturevalue(f"{request.param}_dashboard")


async def open_agent(
    dashboard: LiveDashboard, agent_id: str, elections: list[str], *, token: str | None = None
) -> ClientConnection:
    """An agent's websocket that has sent its hello (the answer is left to read)."""
    ws = await connect(
        dashboard.ws_agent,
        additional_headers={"Authorization": f"Bearer {token or dashboard.token(agent_id)}"},
    )
    hello = {
        "type": "hello",
        "agent": agent_id,
        "hostname": "test",
        "version": "t",
        "elections": [{"name": n, "backend": "raft", "ttl": 1} for n in elections],
        "last_seq": 0,
    }
    await ws.send(json.dumps(hello))
    return ws


async def frame(ws: ClientConnection, timeout: float = 10) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


@dataclass
class LiveViewer:
    """A browser's live socket as the page's script drives it: frames are acked once read."""

    ws: ClientConnection
    applied: int = 0

    async def next(self, *, ack: bool = True, timeout: float = 10) -> str:
        text = await asyncio.wait_for(self.ws.recv(), timeout)
        self.applied += 1
        if ack:
            await self.ack()
        return text

    async def ack(self) -> None:
        await self.ws.send(json.dumps({"ack": self.applied}))

    async def drain(self, quiet: float = 1.0) -> list[str]:
        """Read (and ack) frames until none comes for ``quiet`` seconds."""
        frames = []
        while True:
            try:
                frames.append(await self.next(timeout=quiet))
            except TimeoutError:
                return frames

    async def until(self, wanted: str, timeout: float = 10) -> str:
        """Read (and ack) frames until one contains ``wanted``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"no live frame with {wanted!r} within {timeout}s")
            text = await self.next(timeout=left)
            if wanted in text:
                return text


async def hello_many(
    dashboard: LiveDashboard, agent_id: str, names: list[str], token: str, **labels: str
) -> ClientConnection:
    """An agent holding many elections (one hello), its ack read."""
    ws = await connect(dashboard.ws_agent, additional_headers={"Authorization": f"Bearer {token}"})
    await ws.send(
        json.dumps(
            {
                "type": "hello",
                "agent": agent_id,
                "elections": [
                    {"name": n, "backend": "raft", "ttl": 1, "labels": labels} for n in names
                ],
            }
        )
    )
    assert (await frame(ws))["type"] == "ack"
    return ws


def link_agents(
    dashboard: LiveDashboard, workdir: Path, ids: list[str]
) -> Callable[[int, dict[str, Any]], None]:
    """A ``Cluster`` ``configure`` hook: agent ``i`` reports to ``dashboard`` as ``ids[i]``,
    with a token of its own and a spool file that survives its restarts."""
    tokens = dashboard.tokens(ids)

    def configure(i: int, raw: dict[str, Any]) -> None:
        token_file = workdir / f"{ids[i]}.token"
        token_file.write_text(tokens[ids[i]])
        raw["agent"].update(
            dashboard=dashboard.ws_agent,
            token_file=str(token_file),
            spool=str(workdir / f"{ids[i]}.spool"),
            heartbeat="1s",
        )

    return configure


def stored_history(
    dashboard: LiveDashboard, ids: list[str], election: str
) -> tuple[dict[str, list[dict]], list[dict]]:
    """What the dashboard stored: every transition of these agents (by agent, in seq order),
    and the terms it derived for ``election`` (oldest first)."""
    out = dashboard.shell(
        "import json; from elections.models import Term, Transition as T; "
        f"rows = T.objects.filter(agent_id__in={ids!r}).order_by('agent_id', 'seq').values("
        "'agent_id', 'seq', 'election__name', 'from_state', 'to_state', 'token', 'agent_time'); "
        f"terms = Term.objects.filter(election__name={election!r}).order_by('token').values("
        "'leader_id', 'token', 'started', 'ended', 'end_reason'); "
        "print(json.dumps([list(rows), list(terms)], default=str))",
    )
    rows, terms = json.loads(out)
    stored: dict[str, list[dict]] = {a: [] for a in ids}
    for row in rows:
        stored[row["agent_id"]].append(row)
    return stored, terms
