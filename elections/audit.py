"""The audit log: an append-only, hash-chained record of who did what.

Each entry's ``hash`` is ``sha256(prev_hash + canonical JSON of its fields)`` and its
``prev_hash`` is the hash of the entry before it, so changing or deleting any entry breaks
the chain at that point; ``verify()`` finds where. Appends are serialized so that two writers
never chain onto the same predecessor (a fork would look like tampering):

- PostgreSQL: a transaction-level advisory lock, held until the surrounding transaction ends.
  The two-key form keeps it out of the single-bigint keyspace the agents' PostgreSQL backend
  uses for elections (``lock_id``), should both share a database.
- SQLite: settings open every transaction with ``BEGIN IMMEDIATE``, which takes the database's
  write lock before the last hash is read.

``record`` may run inside an outer transaction (it then joins it: the entry commits or rolls
back with the change it describes). The lock is held until that outer transaction ends, so
call ``record`` as the last write of a transaction: a holder that goes on to wait for row
locks can deadlock with a writer that holds those rows and waits for the audit lock.
The chain assumes READ COMMITTED (Django's default): each statement after the lock sees the
entry the previous holder committed.
"""

from __future__ import annotations

import getpass
import hashlib
import ipaddress
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any, NamedTuple

from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, transaction
from django.utils import timezone
from django.utils.ipv6 import clean_ipv6_address

from elections.models import AuditEntry

#: Who acts and what they did: the enums on the model, under short names for callers.
Actor = AuditEntry.ActorType
Action = AuditEntry.Action

GENESIS = "0" * 64
#: pg_advisory_xact_lock(int4, int4) keys: "Elec", "Audt".
LOCK_KEYS = (0x456C6563, 0x41756474)
ACTOR_TYPES = {choice.value for choice in AuditEntry.ActorType}


@dataclass(frozen=True)
class Pending:
    """An entry to append later in the same transaction (see ``record_many``)."""

    actor_type: str
    actor: str
    action: str
    target: str = ""
    detail: dict[str, Any] | None = field(default=None)
    ip: str | None = None


class Verdict(NamedTuple):
    ok: bool
    checked: int
    broken_id: int | None
    message: str


def record(
    actor_type: str,
    actor: str,
    action: str,
    target: str = "",
    detail: dict[str, Any] | None = None,
    ip: str | None = None,
) -> AuditEntry:
    """Append one entry to the chain and return it."""
    [entry] = record_many([Pending(actor_type, actor, action, target, detail, ip)])
    return entry


def record_many(pending: Iterable[Pending]) -> list[AuditEntry]:
    """Append several entries under one lock, in order (one lock, one read, one insert)."""
    items = list(pending)
    if not items:
        return []
    # savepoint=False: inside an outer transaction a failed append must fail that transaction
    # too (a change must not commit without its audit entry), and it saves two round trips.
    with transaction.atomic(savepoint=False):
        _lock()
        prev = AuditEntry.objects.order_by("-id").values_list("hash", flat=True).first() or GENESIS
        entries = []
        for item in items:
            entry = _build(item, prev)
            entries.append(entry)
            prev = entry.hash
        return AuditEntry.objects.bulk_create(entries)


def _lock() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", LOCK_KEYS)
    # sqlite: the IMMEDIATE transaction already holds the write lock (settings).


def _build(item: Pending, prev: str) -> AuditEntry:
    if item.actor_type not in ACTOR_TYPES:
        raise ValueError(
            f"actor_type must be one of {sorted(ACTOR_TYPES)}, not {item.actor_type!r}"
        )
    entry = AuditEntry(
        at=timezone.now(),
        actor_type=item.actor_type,
        # Truncated rather than refused: actor and target can come from outside (a failed
        # login's username), and losing the entry would be worse than shortening it.
        actor=str(item.actor)[: AuditEntry._meta.get_field("actor").max_length],
        action=item.action,
        target=str(item.target or "")[: AuditEntry._meta.get_field("target").max_length],
        detail=_plain(item.detail),
        ip=_ip(item.ip),
        prev_hash=prev,
    )
    entry.hash = entry_hash(entry)
    return entry


def _plain(detail: dict[str, Any] | None) -> dict[str, Any]:
    """The detail as the database will give it back (datetimes as text, tuples as lists), so
    the hash computed now is the hash ``verify`` recomputes from the stored row."""
    if detail is None:
        return {}
    return json.loads(json.dumps(detail, cls=DjangoJSONEncoder, allow_nan=False))


def _ip(ip: str | None) -> str | None:
    """The address in the form the database gives back, or None when it is not an address."""
    if not ip:
        return None
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])  # without an IPv6 zone id
    except ValueError:
        return None
    # Django's form, which is PostgreSQL's too: "::ffff:10.0.0.1", where Python 3.11 would
    # write "::ffff:a00:1".
    return clean_ipv6_address(str(address)) if address.version == 6 else str(address)


def canonical(entry: AuditEntry) -> bytes:
    fields = [
        entry.at.astimezone(UTC).isoformat(),
        entry.actor_type,
        entry.actor,
        entry.action,
        entry.target,
        _numbers(entry.detail),
        entry.ip,
    ]
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _numbers(value: Any) -> Any:
    """Integral floats as ints: PostgreSQL's jsonb gives ``1e20`` back as an integer."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def entry_hash(entry: AuditEntry) -> str:
    return hashlib.sha256(entry.prev_hash.encode() + canonical(entry)).hexdigest()


def verify() -> Verdict:
    """Walk the chain in id order (constant memory); report the first broken link.

    ``checked`` counts the entries read, including a broken one. A deleted entry shows at
    the entry after it (its ``prev_hash`` no longer matches). Truncating the newest entries
    cannot be seen from inside the chain: compare the reported head hash with one kept
    elsewhere.
    """
    prev_hash, prev_id, checked = GENESIS, None, 0
    for entry in AuditEntry.objects.order_by("id").iterator(chunk_size=2000):
        checked += 1
        if entry.prev_hash != prev_hash:
            after = f"entry {prev_id}" if prev_id is not None else "the start of the chain"
            return Verdict(
                False,
                checked,
                entry.id,
                f"entry {entry.id}: prev_hash {entry.prev_hash[:12]}… does not match {after} "
                f"({prev_hash[:12]}…): an entry before it was deleted, or that link was changed",
            )
        computed = entry_hash(entry)
        if computed != entry.hash:
            return Verdict(
                False,
                checked,
                entry.id,
                f"entry {entry.id}: stored hash {entry.hash[:12]}… but its fields hash to "
                f"{computed[:12]}…: the entry was changed after it was written",
            )
        prev_hash, prev_id = entry.hash, entry.id
    return Verdict(True, checked, None, f"{checked} entries intact; head {prev_hash}")


def cli_actor() -> str:
    """Who ran a management command, as far as the machine knows: the actor of CLI changes."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name and no passwd entry for the uid (containers)
        return "cli"


# -- the head, kept outside the database ----------------------------------------------------
#
# Deleting the newest entries leaves an intact, shorter chain: nothing inside the database
# can show it. So the head (id and hash of the newest entry) is published periodically to
# places the database's owner does not control as easily: the log, and an append-only file
# (``ELECTORATE_AUDIT_HEAD_FILE``). ``verify_heads`` then checks that every head once
# published is still in the chain.

head_log = logging.getLogger("electorate.audit")


def head() -> tuple[int, str] | None:
    row = AuditEntry.objects.order_by("-id").values_list("id", "hash").first()
    return (row[0], row[1]) if row else None


def publish_head(path: Path | None, last: str | None = None) -> tuple[int, str] | None:
    """Log the head and append it to ``path`` (one JSON line) unless it is ``last``."""
    current = head()
    if current is None or current[1] == last:
        return current
    entry_id, entry_hash = current
    head_log.info("audit head: entry %d hash %s", entry_id, entry_hash)
    if path is not None:
        line = json.dumps({"at": timezone.now().isoformat(), "id": entry_id, "hash": entry_hash})
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as out:
            out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())
    return current


def read_heads(path: Path) -> list[tuple[int | None, str]]:
    """The heads a file recorded, oldest first (lines ``publish_head`` wrote, or bare hashes)."""
    heads: list[tuple[int | None, str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            record = json.loads(line)
            heads.append((record.get("id"), str(record["hash"])))
        else:
            heads.append((None, line))
    return heads


def verify_heads(heads: Iterable[tuple[int | None, str]]) -> Verdict:
    """Every head once published must still be in the chain (at its id, when known)."""
    checked = 0
    for entry_id, entry_hash in heads:
        checked += 1
        found = AuditEntry.objects.filter(hash=entry_hash).values_list("id", flat=True).first()
        if found is None:
            where = f" (entry {entry_id})" if entry_id is not None else ""
            return Verdict(
                False,
                checked,
                entry_id,
                f"the head {entry_hash[:12]}…{where} published earlier is no longer in the log: "
                "entries at or after it were deleted",
            )
        if entry_id is not None and found != entry_id:
            return Verdict(
                False, checked, entry_id, f"head {entry_hash[:12]}… moved to entry {found}"
            )
    return Verdict(True, checked, None, f"{checked} published head(s) still in the chain")
