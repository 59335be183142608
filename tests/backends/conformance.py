"""Helpers for the backend conformance suite (and ``bench/failover.py``).

Each backend plugs in through ``tests/backends/setup_<name>.py`` (see the contract in
``test_conformance.py``). Configs are always built the way the agent builds them, through
``agent.config.build_config`` from a dict shaped like the TOML, so the suite also checks that
what a setup module returns is a valid ``[[election]]`` table.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Self

from agent.backends.base import Backend
from agent.backends.registry import BACKENDS, backend_class
from agent.config import ElectionConfig, build_config
from agent.runner import ElectionRunner, Transition
from tests.helpers import REPO, free_port, repo_python

NAMES: list[str] = list(BACKENDS)


# -- targets: one backend, its setup module and its server ------------------------------------


@dataclass
class Target:
    """One backend under test against its real server."""

    name: str
    setup: ModuleType
    server: str | None

    @property
    def cls(self) -> type[Backend]:
        return backend_class(self.name)

    @property
    def ttl(self) -> float:
        return float(self.setup.TTL)

    def election_name(self) -> str:
        # Unique per test: other engineers run against the same servers at the same time.
        return f"conf-{self.name}-{uuid.uuid4().hex[:12]}"

    def election_table(self, election: str, index: int, n: int) -> dict[str, Any]:
        """The ``[[election]]`` table agent ``index`` of ``n`` would have in its TOML."""
        table = {"name": election, "backend": self.name, "ttl": self.ttl}
        table.update(self.setup.options(self.server, election, index, n))
        return table

    def raw_config(
        self, agent_id: str, election: str, index: int, n: int, **agent: Any
    ) -> dict[str, Any]:
        return {
            "agent": {"id": agent_id, **agent},
            "election": [self.election_table(election, index, n)],
        }

    def config(self, election: str, index: int, n: int) -> ElectionConfig:
        raw = self.raw_config(agent_id(index), election, index, n)
        return build_config(raw, Path(f"<{self.name} conformance>")).elections[0]

    async def cleanup(self, election: str) -> None:
        """Optional ``cleanup(server, election)`` hook of a setup module (buckets, tables)."""
        hook = getattr(self.setup, "cleanup", None)
        if hook is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(hook(self.server, election), timeout=10)


def load_setup(name: str) -> ModuleType:
    return importlib.import_module(f"tests.backends.setup_{name}")


def target(name: str, server: str | None) -> Target:
    return Target(name, load_setup(name), server)


def target_for(request: Any) -> Target:
    """The Target of a fixture parametrized by backend name, its server fixture requested."""
    module = load_setup(request.param)  # a missing module fails (errors) this backend's cases
    server = request.getfixturevalue(module.SERVER_FIXTURE) if module.SERVER_FIXTURE else None
    return Target(request.param, module, server)


def agent_id(index: int) -> str:
    return f"agent-{index}"


# -- in-process runners -----------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One callback, with what the other runners claimed at that very moment."""

    at: float
    agent: str
    kind: str  # "campaign", "won", "lost"
    token: int | None = None
    reason: str | None = None
    others_leading: tuple[str, ...] = ()


@dataclass
class Recorder:
    """Collects every runner's callbacks, in the order they fired."""

    runners: list[ElectionRunner] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    transitions: list[tuple[float, str, Transition]] = field(default_factory=list)

    def _record(self, agent: str, kind: str, **kw: Any) -> None:
        # Runs synchronously inside the runner's transition, so the snapshot is exact.
        others = tuple(r.agent_id for r in self.runners if r.agent_id != agent and r.is_leader())
        self.events.append(Event(time.monotonic(), agent, kind, others_leading=others, **kw))

    def callbacks(self, agent: str) -> dict[str, Callable[..., None]]:
        def on_campaign(election: str) -> None:
            self._record(agent, "campaign")

        def on_won(election: str, token: int | None) -> None:
            self._record(agent, "won", token=token)

        def on_lost(election: str, reason: str | None) -> None:
            self._record(agent, "lost", reason=reason)

        def on_transition(transition: Transition) -> None:
            self.transitions.append((time.monotonic(), agent, transition))

        return {
            "on_campaign": on_campaign,
            "on_won": on_won,
            "on_lost": on_lost,
            "on_transition": on_transition,
        }

    def of(self, agent: str, kinds: Iterable[str] = ("campaign", "won", "lost")) -> list[Event]:
        return [e for e in self.events if e.agent == agent and e.kind in kinds]

    def wins(self) -> list[Event]:
        return [e for e in self.events if e.kind == "won"]


def make_runners(
    t: Target,
    n: int = 3,
    *,
    election: str | None = None,
    recorder: Recorder | None = None,
    hold_off: float = 1.0,
) -> list[ElectionRunner]:
    election = election or t.election_name()
    runners = []
    for i in range(n):
        callbacks = recorder.callbacks(agent_id(i)) if recorder else {}
        # No flap damper: churn tests make the same agents win many times on purpose.
        runner = ElectionRunner(
            t.config(election, i, n), agent_id(i), hold_off=hold_off, flap_limit=0, **callbacks
        )
        runners.append(runner)
    if recorder is not None:
        recorder.runners.extend(runners)
    return runners


async def start_all(runners: list[ElectionRunner]) -> None:
    for runner in runners:
        await runner.start()


async def stop_all(runners: list[ElectionRunner], *, resign: bool = True) -> None:
    await asyncio.gather(*(r.stop(resign=resign) for r in runners), return_exceptions=True)


class Elections:
    """What a test started (in-process runners, agent clusters), stopped and cleaned up when
    it ends, whatever it asserted: the ``elections`` fixture of the conformance suite."""

    def __init__(self) -> None:
        self._groups: list[tuple[Target, list[ElectionRunner]]] = []
        self._clusters: list[Cluster] = []
        self._no_resign: list[ElectionRunner] = []

    async def start(
        self, t: Target, n: int = 3, *, recorder: Recorder | None = None
    ) -> list[ElectionRunner]:
        """``n`` runners of one fresh election (see ``make_runners``), started."""
        runners = make_runners(t, n, recorder=recorder)
        self._groups.append((t, runners))
        await start_all(runners)
        return runners

    async def recorded(self, t: Target, n: int = 3) -> tuple[list[ElectionRunner], Recorder]:
        """``start``, with a recorder of what the runners report."""
        recorder = Recorder()
        return await self.start(t, n, recorder=recorder), recorder

    def cluster(self, t: Target, workdir: Path, n: int = 3) -> Cluster:
        """``n`` agent processes of one fresh election (see ``Cluster``), started."""
        cluster = Cluster(t, workdir, n)
        self._clusters.append(cluster)
        cluster.start()
        return cluster

    def stop_without_resign(self, runner: ElectionRunner) -> None:
        """Stop ``runner`` after the others and without resigning (it was cut off)."""
        self._no_resign.append(runner)

    async def stop(self) -> None:
        """Stop everything now (leaders resign) and clean up; the test's end does it otherwise."""
        groups, self._groups = self._groups, []
        clusters, self._clusters = self._clusters, []
        for t, runners in groups:
            await stop_all([r for r in runners if r not in self._no_resign])
            cut = [r for r in runners if r in self._no_resign]
            if cut:
                await stop_all(cut, resign=False)
            await t.cleanup(runners[0].name)
        for cluster in clusters:
            await cluster.close()


def leaders(runners: Iterable[ElectionRunner]) -> list[ElectionRunner]:
    return [r for r in runners if r.is_leader()]


async def wait_until(
    check: Callable[[], Any], timeout: float, what: str, interval: float = 0.005
) -> Any:
    """Poll ``check`` (fast: failover times are measured with it) until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:.1f}s (last: {value!r})")
        await asyncio.sleep(interval)


async def one_leader(runners: list[ElectionRunner], timeout: float) -> ElectionRunner:
    found = await wait_until(
        lambda: leaders(runners) if len(leaders(runners)) == 1 else None,
        timeout,
        "exactly one leader",
    )
    return found[0]


def describe(
    runners: Iterable[ElectionRunner],
) -> list[tuple[str, str, str | None, int | None, bool]]:
    """(agent, state, leader it names, token, is_leader) of each runner, for failure messages."""
    return [(r.agent_id, r.state, r.leader, r.token, r.is_leader()) for r in runners]


async def settled_leader(runners: list[ElectionRunner], timeout: float) -> ElectionRunner:
    """Exactly one runner leads and every runner names it (followers watch the seat)."""
    deadline = time.monotonic() + timeout
    while True:
        current = leaders(runners)
        if len(current) == 1 and all(r.leader == current[0].agent_id for r in runners):
            return current[0]
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"no settled leader within {timeout:.1f}s: (agent, state, names, token, "
                f"is_leader) = {describe(runners)}"
            )
        await asyncio.sleep(0.005)


class Background:
    """A sampler that runs ``_run`` as a background task for the ``async with`` block."""

    task_name = "sampler"
    _task: asyncio.Task[None]

    async def _run(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name=self.task_name)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class Sampler(Background):
    """Samples ``is_leader()`` of every runner every few ms in the background.

    Records every moment two runners claimed leadership at once, and the sequence of
    (leader, token) as it changed.
    """

    task_name = "leader sampler"

    def __init__(self, runners: list[ElectionRunner], interval: float = 0.002) -> None:
        self.runners = runners
        self.interval = interval
        self.samples = 0
        self.overlaps: list[tuple[float, list[tuple[str, int | None]]]] = []
        self.changes: list[tuple[str | None, int | None]] = []

    async def _run(self) -> None:
        while True:
            current = [(r.agent_id, r.token) for r in self.runners if r.is_leader()]
            self.samples += 1
            if len(current) > 1:
                self.overlaps.append((time.monotonic(), current))
            head = current[0] if current else (None, None)
            if not self.changes or self.changes[-1] != head:
                self.changes.append(head)
            await asyncio.sleep(self.interval)


# -- agent processes --------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are valid in TOML basic strings
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def toml_dumps(raw: dict[str, Any]) -> str:
    """Just enough TOML for an agent config: [agent] and [[election]] tables."""
    lines = ["[agent]"]
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in raw.get("agent", {}).items()]
    for table in raw.get("election", []):
        lines += ["", "[[election]]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


async def http_get(
    port: int, path: str, timeout: float = 1.0, host: str = "127.0.0.1"
) -> tuple[int, bytes] | None:
    """GET from host:port; None when the agent does not answer (not up, or dead)."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            data = await reader.read()
        status = int(data.split(b" ", 2)[1])
        return status, data.partition(b"\r\n\r\n")[2]
    except (OSError, TimeoutError, ValueError, IndexError):
        return None
    finally:
        if writer is not None:
            writer.close()


@dataclass(eq=False)
class AgentProcess:
    """One ``python -m agent run --config FILE`` process with a health endpoint.

    ``prefix`` goes before the command: ``ip netns exec NS`` runs the agent in a network
    namespace of its own (it execs, so the process is still the agent's and SIGKILL hits it),
    where its health endpoint is reached on ``host``.
    """

    id: str
    election: str
    config: Path
    health_port: int
    _: KW_ONLY
    host: str = "127.0.0.1"
    prefix: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def log(self) -> Path:
        return self.config.with_suffix(".log")

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, repo_python(), "-m", "agent", "run", "--config", str(self.config)],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def leading(self) -> bool | None:
        """The health endpoint's answer: True (200), False (503), None (no answer)."""
        reply = await http_get(
            self.health_port, f"/health/leadership/{self.election}", 0.5, self.host
        )
        if reply is None or reply[0] not in (200, 503):
            return None
        return reply[0] == 200

    async def seen_leader(self) -> str | None:
        """Who this agent believes leads the election (from ``GET /health``)."""
        state = await self.state()
        return None if state is None else state.get("leader")

    async def state(self) -> dict[str, Any] | None:
        """This agent's view of the election (from ``GET /health``), or None."""
        status = await self.status()
        if status is None:
            return None
        with contextlib.suppress(KeyError, TypeError, ValueError):
            return dict(status["elections"][self.election])
        return None

    async def status(self) -> dict[str, Any] | None:
        """The whole ``GET /health`` document (elections, spool, dashboard link), or None."""
        reply = await http_get(self.health_port, "/health", 0.5, self.host)
        if reply is None or reply[0] != 200:
            return None
        with contextlib.suppress(ValueError, TypeError):
            return dict(json.loads(reply[1]))
        return None

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            return await asyncio.to_thread(self.proc.wait, timeout)
        return None

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
            return f"--- {self.id} log ---\n" + "\n".join(text)
        return ""


class Cluster:
    """``n`` agent processes taking part in one fresh election of one backend.

    ``configure(index, raw)`` may change agent ``index``'s config (a dict shaped like its TOML)
    before it is written: a dashboard link, a spool, other addresses. ``hosts`` and
    ``prefixes`` place agents elsewhere than loopback (see ``AgentProcess``). ``ids`` names the
    agents (default agent-0, agent-1, ...): unique ids keep clusters apart on one dashboard.
    """

    def __init__(
        self,
        t: Target,
        workdir: Path,
        n: int = 3,
        hold_off: str = "2s",
        *,
        configure: Callable[[int, dict[str, Any]], None] | None = None,
        hosts: list[str] | None = None,
        prefixes: list[list[str]] | None = None,
        ids: list[str] | None = None,
    ) -> None:
        self.target = t
        self.election = t.election_name()
        self.agents: list[AgentProcess] = []
        workdir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            port = free_port()
            host = hosts[i] if hosts else "127.0.0.1"
            name = ids[i] if ids else agent_id(i)
            raw = t.raw_config(
                name, self.election, i, n, health=f"{host}:{port}", hold_off=hold_off
            )
            if configure is not None:
                configure(i, raw)
            path = workdir / f"{self.election.replace('/', '_')}-{name}.toml"
            path.write_text(toml_dumps(raw))
            prefix = prefixes[i] if prefixes else []
            self.agents.append(
                AgentProcess(name, self.election, path, port, host=host, prefix=prefix)
            )

    def start(self) -> None:
        for agent in self.agents:
            agent.start()

    def logs(self) -> str:
        return "\n".join(a.tail() for a in self.agents)

    def live(self) -> list[AgentProcess]:
        return [a for a in self.agents if a.alive]

    async def leader(self, timeout: float) -> AgentProcess:
        """Exactly one live agent answers 200, and every other live one knows it leads."""
        deadline = time.monotonic() + timeout
        answers: list[bool | None] = []
        while time.monotonic() < deadline:
            live = self.live()
            answers = list(await asyncio.gather(*(a.leading() for a in live)))
            if answers.count(True) == 1 and None not in answers:
                leader = live[answers.index(True)]
                seen = await asyncio.gather(*(a.seen_leader() for a in live if a is not leader))
                # Followers must already watch the seat, or a resign would be timed from
                # their start-up rather than from the resign.
                if all(s == leader.id for s in seen):
                    return leader
            await asyncio.sleep(0.05)
        raise AssertionError(
            f"no single settled leader within {timeout:.0f}s (answers {answers})\n{self.logs()}"
        )

    async def failover(self, leader: AgentProcess, sig: int, timeout: float) -> tuple[float, str]:
        """Send ``sig`` to the leader; seconds until another agent's endpoint answers 200."""
        others = [a for a in self.agents if a is not leader and a.alive]
        started = time.monotonic()
        leader.send(sig)
        while True:
            answers = await asyncio.gather(*(a.leading() for a in others))
            elapsed = time.monotonic() - started
            if True in answers:
                return elapsed, others[answers.index(True)].id
            if elapsed > timeout:
                raise AssertionError(
                    f"no new leader {elapsed:.1f}s after signal {sig} to {leader.id}\n{self.logs()}"
                )
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        for agent in self.agents:
            if agent.alive:
                agent.send(signal.SIGTERM)
        for agent in self.agents:
            if await agent.wait(self.target.ttl + 8) is None and agent.proc is not None:
                agent.proc.kill()
                agent.proc.wait()
        await self.target.cleanup(self.election)


class HealthSampler(Background):
    """Asks every agent's health endpoint whether it leads, every ``interval`` seconds.

    A round sends all requests at once; a round in which two agents answered 200 is an overlap.
    Consecutive overlapping rounds form one span, reported as (first, last, agents), so a
    failure says for how long two agents claimed the seat.

    With ``tokens``, each agent that answered 200 is also asked (``GET /health``) for the
    fencing token it holds, and every change of (leader, token) is kept in ``terms``.
    """

    task_name = "health sampler"

    def __init__(
        self, agents: list[AgentProcess], interval: float = 0.02, *, tokens: bool = False
    ) -> None:
        self.agents = agents
        self.interval = interval
        self.tokens = tokens
        self.rounds = 0
        #: (monotonic time the round was sent, ids of the agents that answered 200)
        self.history: list[tuple[float, tuple[str, ...]]] = []
        #: (monotonic time first seen, leader, the token it reported), one entry per change.
        self.terms: list[tuple[float, str, int | None]] = []

    async def _run(self) -> None:
        while True:
            sent = time.monotonic()
            answers = await asyncio.gather(*(a.leading() for a in self.agents))
            self.rounds += 1
            leaders = [a for a, yes in zip(self.agents, answers, strict=True) if yes]
            self.history.append((sent, tuple(a.id for a in leaders)))
            if self.tokens and leaders:
                states = await asyncio.gather(*(a.state() for a in leaders))
                for agent, state in zip(leaders, states, strict=True):
                    # It may have lost the seat between the two requests: only a token it
                    # still claims to lead with counts.
                    if state is not None and state.get("is_leader"):
                        self._term(sent, agent.id, state.get("token"))
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - sent)))

    def _term(self, at: float, agent: str, token: int | None) -> None:
        if not self.terms or self.terms[-1][1:] != (agent, token):
            self.terms.append((at, agent, token))

    def token_problems(self) -> list[str]:
        """Each change of (leader, token) must carry an integer token higher than every token
        seen before it: tokens only grow across leaders, and one term keeps one token."""
        problems = []
        highest: tuple[str, int] | None = None
        for _, agent, token in self.terms:
            if not isinstance(token, int):
                problems.append(f"{agent} led with token {token!r}")
            elif highest is not None and token <= highest[1]:
                problems.append(
                    f"{agent} led with token {token} after {highest[0]} led with {highest[1]}"
                )
            if isinstance(token, int) and (highest is None or token > highest[1]):
                highest = (agent, token)
        return problems

    def leaders_since(self, since: float) -> list[tuple[str, ...]]:
        return [leading for at, leading in self.history if at >= since and leading]

    def overlaps(self) -> list[tuple[float, float, tuple[str, ...]]]:
        spans: list[tuple[float, float, tuple[str, ...]]] = []
        current: tuple[float, float, tuple[str, ...]] | None = None
        for at, leading in self.history:
            if len(leading) > 1:
                current = (current[0], at, leading) if current else (at, at, leading)
            elif current is not None:
                spans.append(current)
                current = None
        if current is not None:
            spans.append(current)
        return spans
