"""Agent configuration: the agent's TOML file.

Its format is a contract with operators: a file that loads today must still load, and mean the
same, after an upgrade.

A bad file fails at start with the file, the field and what is wrong (``ConfigError``).
Backend options are validated by each backend's own options model (``backends.registry``).
"""

from __future__ import annotations

import os
import socket
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from agent.durations import Duration
from protocol import AgentId, Labels, Name


class ConfigError(Exception):
    """A config problem, worded for the operator who wrote the file."""

    def __init__(self, path: str | os.PathLike[str], field: str, message: str) -> None:
        self.path = str(path)
        self.field = field
        self.message = message
        super().__init__(f"{self.path}: {field}: {message}" if field else f"{self.path}: {message}")


def _int_as_text(value: object) -> object:
    """A TOML integer where an address is expected is a port (a bool is not, though an int)."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class AgentSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: AgentId = Field(default_factory=lambda: socket.gethostname().split(".")[0])
    dashboard: str | None = None
    token_file: str | None = None
    #: CA certificates (PEM) that sign a wss:// dashboard's certificate; default: the system's.
    ca_file: str | None = None
    spool: str | None = None
    #: "HOST:PORT"; a port alone ("9101", ":9101", 9101) binds 127.0.0.1.
    health: Annotated[str | None, BeforeValidator(_int_as_text)] = None
    heartbeat: Duration = 3.0
    #: How long a leader stays out of the race after a voluntary resign.
    hold_off: Duration = 2.0


class ElectionSection(BaseModel):
    """Options every election has; the rest belong to its backend."""

    model_config = ConfigDict(extra="allow")

    name: Name
    backend: str
    ttl: Duration = 10.0
    labels: Labels = {}  # the wire contract's bounds: a hello the dashboard refuses is useless
    #: Observe only: never campaign.
    observer: bool = False

    @property
    def backend_options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


@dataclass
class ElectionConfig:
    name: str
    backend: str
    ttl: float
    labels: dict[str, str]
    observer: bool
    options: Any  # the backend's validated options model


@dataclass
class AgentConfig:
    id: str
    dashboard: str | None
    token: str | None
    ca_file: Path | None
    spool: Path | None
    health: tuple[str, int] | None
    heartbeat: float
    hold_off: float
    elections: list[ElectionConfig] = field(default_factory=list)
    path: Path | None = None


def _field_of(err: dict[str, Any], prefix: str) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    return f"{prefix}.{loc}" if loc else prefix


def _first_error(exc: ValidationError, prefix: str) -> tuple[str, str]:
    err = exc.errors()[0]
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown option"
    elif err["type"] == "missing":
        message = "required option is missing"
    return _field_of(err, prefix), message


def parse_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_health(value: str) -> tuple[str, int]:
    """The health server's address. A port alone binds loopback only (unlike Go's ":9101"):
    the endpoints tell anyone who can reach them which elections this host leads, so
    exposing them is written out, e.g. "0.0.0.0:9101"."""
    text = value.strip()
    if text.isdigit():
        text = f":{text}"
    try:
        return parse_host_port(text)
    except ValueError:
        raise ValueError(f"expected HOST:PORT or a port, got {value!r}") from None


def check_ca_file(path: Path, ca_file: Path, dashboard: str | None) -> None:
    """Refuse at start a CA file that could not verify the dashboard, rather than at every
    reconnect; and one set for a plain ws:// dashboard, which would suggest TLS that is not
    there."""
    if not (dashboard or "").startswith("wss://"):
        raise ConfigError(path, "agent.ca_file", "only used with a wss:// dashboard")
    try:
        ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError as exc:
        problem = f"{ca_file} holds no PEM certificate ({exc.reason})"
        raise ConfigError(path, "agent.ca_file", problem) from None
    except OSError as exc:
        raise ConfigError(path, "agent.ca_file", f"cannot read {ca_file}: {exc.strerror}") from None


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate an agent config file, or raise ConfigError."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from None
    return build_config(raw, path)


def build_config(raw: dict[str, Any], path: Path) -> AgentConfig:
    from agent.backends.registry import backend_class  # late: keeps config importable alone

    unknown = set(raw) - {"agent", "election"}
    if unknown:
        raise ConfigError(path, sorted(unknown)[0], "unknown section")
    try:
        agent = AgentSection.model_validate(raw.get("agent", {}))
    except ValidationError as exc:
        raise ConfigError(path, *_first_error(exc, "agent")) from None

    base = path.parent
    token = os.environ.get("ELECTORATE_AGENT_TOKEN")
    if agent.token_file and not token:
        token_path = base / agent.token_file
        try:
            token = token_path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                path, "agent.token_file", f"cannot read {token_path}: {exc.strerror}"
            ) from None
        if not token:
            raise ConfigError(path, "agent.token_file", f"{token_path} is empty")
    if agent.dashboard:
        if not agent.dashboard.startswith(("ws://", "wss://")):
            raise ConfigError(path, "agent.dashboard", "must be a ws:// or wss:// URL")
        if not token:
            raise ConfigError(
                path,
                "agent.token_file",
                "a dashboard needs a token (token_file or ELECTORATE_AGENT_TOKEN)",
            )
    ca_file = None
    if agent.ca_file:
        ca_file = base / agent.ca_file
        check_ca_file(path, ca_file, agent.dashboard)
    health = None
    if agent.health:
        try:
            health = parse_health(agent.health)
        except ValueError as exc:
            raise ConfigError(path, "agent.health", str(exc)) from None

    sections = raw.get("election", [])
    if not isinstance(sections, list):
        raise ConfigError(path, "election", "must be an array of tables: [[election]]")
    elections: list[ElectionConfig] = []
    seen: set[str] = set()
    for i, item in enumerate(sections):
        prefix = f"election[{i}]"
        try:
            section = ElectionSection.model_validate(item)
        except ValidationError as exc:
            raise ConfigError(path, *_first_error(exc, prefix)) from None
        prefix = f"election[{i}] ({section.name})"
        if section.name in seen:
            raise ConfigError(path, f"{prefix}.name", "duplicate election name")
        seen.add(section.name)
        try:
            cls = backend_class(section.backend)
        except KeyError as exc:
            raise ConfigError(path, f"{prefix}.backend", str(exc.args[0])) from None
        try:
            # Backend options resolve relative paths (secret_file) against the config file.
            options = cls.Options.model_validate(
                section.backend_options, context={"config_dir": base}
            )
        except ValidationError as exc:
            raise ConfigError(path, *_first_error(exc, prefix)) from None
        problem = cls.check_options(options, section.ttl)
        if problem:
            raise ConfigError(path, f"{prefix}.{problem[0]}", problem[1])
        elections.append(
            ElectionConfig(
                name=section.name,
                backend=section.backend,
                ttl=section.ttl,
                labels=section.labels,
                observer=section.observer,
                options=options,
            )
        )
    if not elections:
        raise ConfigError(path, "election", "no [[election]] configured")

    return AgentConfig(
        id=agent.id,
        dashboard=agent.dashboard,
        token=token,
        ca_file=ca_file,
        spool=(base / agent.spool) if agent.spool else None,
        health=health,
        heartbeat=agent.heartbeat,
        hold_off=agent.hold_off,
        elections=elections,
        path=path,
    )
