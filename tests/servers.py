"""The real servers the tests talk to.

PostgreSQL, Redis and NATS run on this machine already (see README); etcd and an
S3-compatible server (moto) are started here on free ports and stopped at the end of the
session. A server that is missing or down fails the tests that need it: never a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

import pytest

from tests.helpers import free_port

PG_DSN = os.environ.get("ELECTORATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("ELECTORATE_TEST_REDIS", "redis://127.0.0.1:6379/14")
NATS_URL = os.environ.get("ELECTORATE_TEST_NATS", "nats://127.0.0.1:4222")


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    rest = url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = rest.partition(":")
    return host or "127.0.0.1", int(port or default_port)


def require_tcp(name: str, host: str, port: int, hint: str) -> None:
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as exc:
        pytest.fail(f"{name} is not reachable on {host}:{port} ({exc}). {hint}", pytrace=False)


def wait_tcp(
    host: str, port: int, proc: subprocess.Popen[bytes], name: str, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{name} exited with code {proc.returncode} at start", pytrace=False)
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail(f"{name} did not listen on {host}:{port} within {timeout}s", pytrace=False)


@dataclass
class Managed:
    """A server process this test session owns."""

    proc: subprocess.Popen[bytes]
    url: str
    workdir: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def serving(start: Callable[[], Managed]) -> Iterator[str]:
    """A session fixture's body: the URL of the server ``start`` started, stopped afterwards."""
    server = start()
    yield server.url
    server.stop()


def start_etcd() -> Managed:
    binary = shutil.which("etcd")
    if not binary:
        pytest.fail(
            "etcd is not installed: run `make test` (it installs Debian's etcd-server)",
            pytrace=False,
        )
    workdir = Path(tempfile.mkdtemp(prefix="electorate-etcd-"))
    client, peer = free_port(), free_port()
    url = f"http://127.0.0.1:{client}"
    proc = subprocess.Popen(
        [
            binary,
            "--name",
            "test",
            "--data-dir",
            str(workdir / "data"),
            "--listen-client-urls",
            url,
            "--advertise-client-urls",
            url,
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"test=http://127.0.0.1:{peer}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "etcd.log", "wb"),  # noqa: SIM115 - owned by the process
    )
    wait_tcp("127.0.0.1", client, proc, "etcd")
    return Managed(proc, url, workdir)


def start_moto() -> Managed:
    binary = Path(sys.executable).with_name("moto_server")
    if not binary.exists():
        pytest.fail(
            "moto_server is not installed: run `make test` (it installs moto[server])",
            pytrace=False,
        )
    workdir = Path(tempfile.mkdtemp(prefix="electorate-s3-"))
    port = free_port()
    proc = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "moto.log", "wb"),  # noqa: SIM115 - owned by the process
    )
    wait_tcp("127.0.0.1", port, proc, "moto_server")
    return Managed(proc, f"http://127.0.0.1:{port}", workdir)


@dataclass
class PrivateServer:
    """A server of the test's own on a free port, storing in ``workdir``, that a test may kill
    and start again; ``private()`` removes it with its files when the test is done."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    #: Names its temporary directory.
    kind: ClassVar[str]

    def prepare(self) -> None:
        """Before the first start."""

    def start(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


S = TypeVar("S", bound=PrivateServer)


@contextlib.contextmanager
def private(cls: type[S]) -> Iterator[S]:
    """A started ``cls`` server, removed when the block ends."""
    server = cls(free_port(), Path(tempfile.mkdtemp(prefix=f"electorate-{cls.kind}-")))
    try:
        server.prepare()
        server.start()
        yield server
    finally:
        server.remove()


@dataclass
class PrivateRedis(PrivateServer):
    """A Redis server of the test's own, on a free port, that a test may stop and restart."""

    kind = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if not binary:
            pytest.fail("redis-server is not installed", pytrace=False)
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "redis.log", "ab"),  # noqa: SIM115 - owned by the process
        )
        wait_tcp("127.0.0.1", self.port, self.proc, "redis-server")


@dataclass
class PrivateNats(PrivateServer):
    """A JetStream ``nats-server`` of the test's own, storing in ``workdir``: killed and
    restarted on the same port, it comes back with its streams (and KV buckets)."""

    kind = "nats"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        if not Path(binary).exists():
            pytest.fail("nats-server is not installed", pytrace=False)
        self.proc = subprocess.Popen(
            [binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "nats.log", "ab"),  # noqa: SIM115 - owned by the process
        )
        wait_tcp("127.0.0.1", self.port, self.proc, "nats-server")


#: PostgreSQL refuses to run as root; a private instance runs as this system user.
PG_USER = "postgres"


@dataclass
class PrivatePostgres(PrivateServer):
    """A PostgreSQL cluster of the test's own (initdb into a temp dir, trust auth, a free
    port), that a test may crash (``pg_ctl stop -m immediate``) and start again."""

    kind = "pg"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def data(self) -> Path:
        return self.workdir / "data"

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [self._binary(args[0]), *args[1:]],
            user=self._user(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            pytest.fail(f"{' '.join(args)} failed: {done.stderr}", pytrace=False)

    @staticmethod
    def _binary(name: str) -> str:
        # Debian keeps the server binaries off PATH, under the major version.
        found = shutil.which(name) or next(
            (
                str(p)
                for p in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
            ),
            None,
        )
        if not found:
            pytest.fail(f"{name} is not installed (PostgreSQL server binaries)", pytrace=False)
        return found

    @staticmethod
    def _user() -> str | None:
        return PG_USER if os.geteuid() == 0 else None

    def prepare(self) -> None:
        if self._user():
            shutil.chown(self.workdir, PG_USER)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self._binary("postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.workdir),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",  # a crash of the server, not of the machine, loses nothing
                "-c",
                "max_connections=50",
            ],
            user=self._user(),
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "postgres.log", "ab"),  # noqa: SIM115 - owned by it
        )
        wait_tcp("127.0.0.1", self.port, self.proc, "postgres", timeout=30)

    def crash(self) -> None:
        """Stop as a crash would: no checkpoint, sessions cut, recovery at the next start."""
        if self.proc is not None and self.proc.poll() is None:
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w")
            self.proc.wait(10)


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    require_tcp("PostgreSQL", *_host_port(PG_DSN, 5432), "It should run on 127.0.0.1:5432.")
    return PG_DSN


@pytest.fixture(scope="session")
def redis_url() -> str:
    require_tcp("Redis", *_host_port(REDIS_URL, 6379), "It should run on 127.0.0.1:6379.")
    return REDIS_URL


@pytest.fixture(scope="session")
def nats_url() -> str:
    require_tcp(
        "NATS", *_host_port(NATS_URL, 4222), "It should run with JetStream on 127.0.0.1:4222."
    )
    return NATS_URL


@pytest.fixture(scope="session")
def etcd_url() -> Iterator[str]:
    yield from serving(start_etcd)


@pytest.fixture(scope="session")
def s3_url() -> Iterator[str]:
    yield from serving(start_moto)
