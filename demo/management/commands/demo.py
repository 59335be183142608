"""``manage.py demo``: migrate, create a login, start the server and three local agents."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from demo import fleet as demo
from elections import actions

USERNAME, PASSWORD = "demo", "electorate-demo"


def _free_ports(n: int) -> list[int]:
    sockets = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CommandError(f"the server exited with code {proc.returncode}; see its log")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise CommandError(f"the server did not listen on {host}:{port} within {timeout}s")


class Command(BaseCommand):
    help = "Run the demo: dashboard on 127.0.0.1:8000 and three agents electing with raft."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--addr", default="127.0.0.1:8000")

    def handle(self, *args: object, addr: str, **options: object) -> None:
        host, _, port_text = addr.rpartition(":")
        port = int(port_text)
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            raise CommandError(f"{addr} is already in use: stop what runs there or pass --addr")
        except OSError:
            pass
        call_command("migrate", verbosity=0, interactive=False)
        user_model = get_user_model()
        user, _ = user_model.objects.get_or_create(username=USERNAME)
        user.is_staff = user.is_superuser = True
        user.set_password(PASSWORD)
        user.save()

        workdir = Path(settings.DATA_DIR) / "demo"
        tokens = {}
        for agent_id in demo.AGENTS:  # a new run replaces the last run's tokens
            actions.revoke_agent_tokens(agent_id, by="demo")
            tokens[agent_id] = actions.issue_agent_token(agent_id, by="demo")
        fleet = demo.write_fleet(
            workdir, f"ws://{addr}/ws/agent/", tokens, _free_ports(len(demo.AGENTS) * 4)
        )
        server_log = workdir / "server.log"
        server = subprocess.Popen(
            [sys.executable, "manage.py", "runserver", addr, "--noreload"],
            cwd=settings.BASE_DIR,
            stdout=open(server_log, "ab"),  # noqa: SIM115 - owned by the child
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        children = [server]
        try:
            _wait_listening(host, port, server, timeout=30)
            children += [demo.start_agent(a, workdir / f"{a.id}.log") for a in fleet]
            health = ", ".join(f"http://127.0.0.1:{a.health}/health" for a in fleet)
            self.stdout.write(
                "\n"
                f"  Electorate is running: http://{addr}/\n"
                f"  Log in as {USERNAME} / {PASSWORD}\n"
                f"  Agents {', '.join(demo.AGENTS)} elect leaders with the raft backend.\n"
                f"  Agent health: {health}\n"
                f"  Logs and configs: {workdir}\n"
                "  Try: kill -9 the leading agent (see its health endpoint) and watch the map.\n"
                "  Ctrl-C stops everything.\n"
            )
            while all(c.poll() is None for c in children[:1]):
                time.sleep(0.5)
            raise CommandError(f"the server stopped; see {server_log}")
        except KeyboardInterrupt:
            self.stdout.write("\nstopping: agents resign, then the server stops")
        finally:
            for child in reversed(children):
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            for child in reversed(children):
                try:
                    child.wait(10)
                except subprocess.TimeoutExpired:
                    child.kill()
