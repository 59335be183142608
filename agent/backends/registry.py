"""Backend names to classes, imported lazily so an agent only loads the clients it uses."""

from __future__ import annotations

import importlib

from agent.backends.base import Backend

BACKENDS: dict[str, str] = {
    "raft": "agent.backends.raft:RaftBackend",
    "postgres": "agent.backends.postgres:PostgresBackend",
    "nats": "agent.backends.nats:NatsBackend",
    "etcd": "agent.backends.etcd:EtcdBackend",
    "s3": "agent.backends.s3:S3Backend",
    "redis": "agent.backends.redis:RedisBackend",
}


def backend_class(name: str) -> type[Backend]:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise KeyError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}") from None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise KeyError(f"backend {name!r} is not available: {exc}") from None
    return getattr(module, attr)
