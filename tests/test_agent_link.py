"""The agent's dashboard link against real websocket servers that misbehave."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

import protocol
from agent.config import ConfigError, load_config
from agent.link import DashboardLink
from agent.service import Agent
from agent.spool import AsyncSpool
from tests.helpers import eventually, free_port


class ScriptedDashboard:
    """A real websocket server in the dashboard's place. Each connection's answer to the hello
    comes from ``answers`` while any are left (garbage first); after that it behaves: acks the
    hello with what it has stored, sends ``mid_session`` frames, stores and acks events."""

    def __init__(self, answers: list[str], mid_session: list[str] | None = None) -> None:
        self.answers = list(answers)
        self.mid_session = mid_session or []
        self.connections = 0
        self.events: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []
        self.stored = 0
        self.url = ""

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionClosed):
            await self._session(ws)

    async def _session(self, ws: ServerConnection) -> None:
        await ws.recv()  # the hello
        if self.answers:
            await ws.send(self.answers.pop(0))
            async for _ in ws:  # until the agent hangs up
                pass
            return
        await ws.send(json.dumps({"type": "ack", "seq": self.stored}))
        for text in self.mid_session:
            await ws.send(text)
        async for text in ws:
            frame = json.loads(text)
            if frame["type"] == "events":
                self.events.extend(frame["items"])
                self.stored = max([self.stored, *(e["seq"] for e in frame["items"])])
                await ws.send(json.dumps({"type": "ack", "seq": self.stored}))
            elif frame["type"] == "result":
                self.results.append(frame)

    @contextlib.asynccontextmanager
    async def running(self, **kwargs: Any) -> AsyncIterator[ScriptedDashboard]:
        async with serve(self.handler, "127.0.0.1", 0, **kwargs) as server:
            port = server.sockets[0].getsockname()[1]
            scheme = "wss" if kwargs.get("ssl") else "ws"
            self.url = f"{scheme}://127.0.0.1:{port}/ws/agent/"
            yield self


def agent_config(tmp_path: Path, dashboard: str, extra: str = "") -> Path:
    (tmp_path / "token").write_text("not-checked-here")
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\nid = "link-1"\ndashboard = "{dashboard}"\ntoken_file = "token"\n'
        f'heartbeat = "200ms"\n{extra}\n'
        '[[election]]\nname = "link/one"\nbackend = "raft"\nttl = "1s"\n'
        f'listen = "127.0.0.1:{free_port()}"\nheartbeat = "50ms"\nelection_timeout = "200ms"\n'
        'secret = "link-test-secret"\n'
    )
    return path


async def test_a_bad_answer_to_the_hello_is_logged_and_the_link_reconnects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = [
        "this is not JSON",
        json.dumps({"type": "command", "kind": "reboot"}),  # an invalid command
        json.dumps({"type": "ack", "seq": -1}),
    ]
    mid_session = [
        "more garbage",
        json.dumps({"type": "command", "id": 1, "kind": "explode", "election": "link/one"}),
        "[1, 2]",
    ]
    async with ScriptedDashboard(garbage, mid_session).running() as dashboard:
        agent = Agent(load_config(agent_config(tmp_path, dashboard.url)))
        await agent.start()
        try:
            await eventually(lambda: agent.is_leader("link/one"), timeout=10)
            link = agent.link
            assert link is not None
            # Three refused sessions, then a good one that delivers the spooled events.
            await eventually(
                lambda: link.connected and dashboard.stored >= 2 and agent.spool.count() == 0,
                timeout=15,
            )
            assert dashboard.connections == len(garbage) + 1
            assert [e["seq"] for e in dashboard.events] == list(range(1, dashboard.stored + 1))
            assert agent._link_task is not None and not agent._link_task.done()
        finally:
            await agent.stop()
    bad = [r.getMessage() for r in caplog.records if "bad frame" in r.getMessage()]
    assert len(bad) == len(garbage) + len(mid_session), bad


async def test_an_unexpected_error_in_a_session_does_not_end_the_link(tmp_path: Path) -> None:
    spool = AsyncSpool(tmp_path / "link.spool")
    await spool.open()
    for state in ("candidate", "leader", "follower"):
        at = datetime.now(UTC).isoformat()
        await spool.append({"election": "x/y", "from": "follower", "to": state, "at": at})
    hellos = 0

    def hello() -> protocol.Hello:
        nonlocal hellos
        hellos += 1
        if hellos == 1:
            raise RuntimeError("the hello could not be built")
        return protocol.Hello(agent="link-2", last_seq=spool.last_seq)

    async def failing_command(command: protocol.Command) -> protocol.Result:
        raise ValueError("the election exploded")

    command = json.dumps({"type": "command", "id": 7, "kind": "step-down", "election": "x/y"})
    async with ScriptedDashboard([], [command]).running() as dashboard:
        link = DashboardLink(
            dashboard.url,
            "token",
            spool,
            hello=hello,
            heartbeat=lambda: protocol.Heartbeat(at=datetime.now(UTC)),
            on_command=failing_command,
        )
        task = asyncio.create_task(link.run())
        try:
            await eventually(lambda: spool.count() == 0 and dashboard.results, timeout=10)
            assert [e["seq"] for e in dashboard.events] == [1, 2, 3]
            assert hellos >= 2 and not task.done()
            (result,) = dashboard.results
            assert result["command"] == 7 and result["ok"] is False
            assert "the election exploded" in result["detail"]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await spool.close()


def make_ca_and_server_cert(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A private CA and a server certificate for 127.0.0.1 signed by it: (CA file, server
    context). Nothing here is in any system trust store."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Electorate test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(directory / "server.pem", directory / "server.key")
    return ca_file, server


async def test_a_wss_dashboard_is_trusted_through_ca_file(tmp_path: Path) -> None:
    _, server_tls = make_ca_and_server_cert(tmp_path / "certs")
    async with ScriptedDashboard([]).running(ssl=server_tls) as dashboard:
        # ca_file is relative to the config file, like token_file.
        agent = Agent(
            load_config(agent_config(tmp_path, dashboard.url, 'ca_file = "certs/ca.pem"'))
        )
        await agent.start()
        try:
            link = agent.link
            assert link is not None
            await eventually(lambda: link.connected and dashboard.stored >= 2, timeout=10)
            assert [e["seq"] for e in dashboard.events] == list(range(1, dashboard.stored + 1))
        finally:
            await agent.stop()


async def test_an_untrusted_dashboard_certificate_is_refused_with_a_clear_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Verification is on by default (the system trust store): a private CA's certificate is
    refused, nothing is sent over that connection, and the log says what to do."""
    make_ca_and_server_cert(tmp_path / "certs")
    _, other_tls = make_ca_and_server_cert(tmp_path / "other")  # another CA's certificate

    async def refusal(url: str, extra: str) -> str:
        agent = Agent(load_config(agent_config(tmp_path, url, extra)))
        await agent.start()
        try:
            link = agent.link
            assert link is not None
            error = await eventually(lambda: link.last_error, timeout=10)
            assert not link.connected
            return str(error)
        finally:
            await agent.stop()

    async with ScriptedDashboard([]).running(ssl=other_tls) as dashboard:
        errors = [
            await refusal(dashboard.url, ""),  # the system trust store
            await refusal(dashboard.url, 'ca_file = "certs/ca.pem"'),  # the wrong CA
        ]
        assert dashboard.connections == 0  # no hello (and no token) went over either
    for error in errors:
        assert "certificate" in error and "ca_file" in error, error
    refused = [r for r in caplog.records if r.levelno >= logging.ERROR and "TLS" in r.message]
    assert len(refused) >= 2, [r.message for r in caplog.records]


async def test_a_ca_file_lost_after_start_does_not_end_the_link(tmp_path: Path) -> None:
    ca_file, server_tls = make_ca_and_server_cert(tmp_path / "certs")
    async with ScriptedDashboard([]).running(ssl=server_tls) as dashboard:
        agent = Agent(
            load_config(agent_config(tmp_path, dashboard.url, 'ca_file = "certs/ca.pem"'))
        )
        saved = ca_file.read_bytes()
        ca_file.unlink()  # e.g. a certificate rotation caught half way
        await agent.start()
        try:
            link = agent.link
            assert link is not None
            await eventually(lambda: link.last_error and "ca.pem" in link.last_error, timeout=10)
            ca_file.write_bytes(saved)
            await eventually(lambda: link.connected and dashboard.stored >= 2, timeout=15)
        finally:
            await agent.stop()


@pytest.mark.parametrize(
    ("dashboard", "ca_text", "problem"),
    [
        ("wss://127.0.0.1:1/ws/agent/", None, "cannot read"),
        ("wss://127.0.0.1:1/ws/agent/", "not a certificate\n", "no PEM certificate"),
        ("ws://127.0.0.1:1/ws/agent/", "ca", "only used with a wss:// dashboard"),
    ],
)
def test_a_bad_ca_file_names_the_file_the_field_and_the_problem(
    tmp_path: Path, dashboard: str, ca_text: str | None, problem: str
) -> None:
    if ca_text == "ca":
        ca_file, _ = make_ca_and_server_cert(tmp_path / "certs")
        (tmp_path / "ca.pem").write_bytes(ca_file.read_bytes())
    elif ca_text is not None:
        (tmp_path / "ca.pem").write_text(ca_text)
    path = agent_config(tmp_path, dashboard, 'ca_file = "ca.pem"')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.path, info.value.field) == (str(path), "agent.ca_file")
    assert problem in info.value.message


@pytest.fixture(autouse=True)
def _agent_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent")


async def test_a_burst_of_transitions_shares_one_frame(tmp_path: Path) -> None:
    frames: list[int] = []

    class Counting(ScriptedDashboard):
        async def _session(self, ws: ServerConnection) -> None:
            await ws.recv()
            await ws.send(json.dumps({"type": "ack", "seq": 0}))
            async for text in ws:
                frame = json.loads(text)
                if frame["type"] == "events":
                    frames.append(len(frame["items"]))
                    top = frame["items"][-1]["seq"]
                    await ws.send(json.dumps({"type": "ack", "seq": top}))

    async with Counting([]).running() as dashboard:
        spool = AsyncSpool(None)
        await spool.open()
        link = DashboardLink(
            dashboard.url,
            "t",
            spool,
            hello=lambda: protocol.Hello(agent="link-1"),
            heartbeat=lambda: protocol.Heartbeat(at=datetime.now(UTC)),
            on_command=lambda c: None,  # type: ignore[arg-type,return-value]
            heartbeat_interval=60,
        )
        task = asyncio.create_task(link.run())
        try:
            await eventually(lambda: link.connected, timeout=10)
            for i in range(5):  # a campaign, a win, other elections moving: within a few ms
                await spool.append(
                    {
                        "election": f"e/{i}",
                        "from": "follower",
                        "to": "candidate",
                        "at": datetime.now(UTC).isoformat(),
                    }
                )
                link.notify()
            await eventually(lambda: sum(frames) == 5, timeout=5)
            assert frames == [5]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await spool.close()


def test_an_unreadable_spooled_event_is_sent_anyway_so_its_seq_is_acked() -> None:
    at = datetime.now(UTC).isoformat()
    good = {"seq": 3, "election": "e/1", "from": "candidate", "to": "leader", "at": at}
    assert protocol.spooled_event(good).seq == 3
    # A leader name some backend reported that is no agent id: dropped, the rest kept.
    odd = protocol.spooled_event({**good, "leader": "not an id!", "token": 7})
    assert (odd.seq, odd.election, odd.leader, odd.token) == (3, "e/1", None, 7)
    # Beyond repair: a placeholder with the same seq says why.
    broken = protocol.spooled_event({"seq": 4, "election": "no spaces allowed", "at": "x"})
    assert (broken.seq, broken.election) == (4, "unreadable-event")
    assert "could not be read" in broken.detail


def test_labels_beyond_the_wire_contract_are_refused_at_load(tmp_path: Path) -> None:
    config = agent_config(tmp_path, "ws://127.0.0.1:1/ws/agent/")
    text = config.read_text().replace(
        'backend = "raft"', 'backend = "raft"\nlabels = { team = "' + "x" * 101 + '" }'
    )
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert "labels" in info.value.field
