"""The audit log: a hash chain that shows tampering, serialized appends, what gets audited."""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.test import Client
from django.test.utils import CaptureQueriesContext

import protocol
from elections import actions, audit
from elections.models import AgentToken, AuditEntry
from elections.tokens import digest

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def five() -> list[AuditEntry]:
    return [
        audit.record("user", "ann", "login", ip="10.0.0.1"),
        audit.record("system", "cli:root", "agent-token-issued", "web-1", {"token_id": 1}),
        audit.record("agent", "web-1", "leader-changed", "billing/cluster", {"token": 7}),
        audit.record("user", "bob", "step-down-requested", "billing/cluster", {"r": "patch"}),
        audit.record("user", "bob", "logout", ip="2001:db8::1"),
    ]


def verify_audit() -> str:
    """Run the management command; return its error, or '' when it passed."""
    try:
        call_command("verify_audit", stdout=open("/dev/null", "w"))  # noqa: SIM115
    except CommandError as error:
        assert error.returncode == 1
        return str(error)
    return ""


def test_the_chain_links_each_entry_to_the_one_before() -> None:
    entries = five()
    assert entries[0].prev_hash == "0" * 64
    for before, entry in itertools.pairwise(entries):
        assert entry.prev_hash == before.hash
    assert audit.verify() == (True, 5, None, f"5 entries intact; head {entries[-1].hash}")
    assert verify_audit() == ""


def test_an_empty_log_verifies() -> None:
    assert audit.verify().ok
    assert audit.verify().checked == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("at", T0),
        ("actor_type", "system"),
        ("actor", "mallory"),
        ("action", "logout"),
        ("target", "search/shard-1"),
        ("detail", {"token": 8}),
        ("ip", "10.6.6.6"),
        ("prev_hash", "f" * 64),
        ("hash", "e" * 64),
    ],
)
def test_changing_any_field_of_an_entry_is_caught_at_that_entry(field: str, value: Any) -> None:
    middle = five()[2]
    AuditEntry.objects.filter(pk=middle.pk).update(**{field: value})
    ok, checked, broken, message = audit.verify()
    assert (ok, checked, broken) == (False, 3, middle.pk)
    assert message.startswith(f"entry {middle.pk}: ")
    assert f"entry {middle.pk}: " in verify_audit()


def test_a_deleted_entry_is_caught_at_the_next_one() -> None:
    entries = five()
    AuditEntry.objects.filter(pk=entries[2].pk).delete()
    verdict = audit.verify()
    assert (verdict.ok, verdict.broken_id) == (False, entries[3].pk)
    assert "deleted" in verdict.message
    assert f"entry {entries[3].pk}: " in verify_audit()


def test_deleting_the_first_entries_is_caught() -> None:
    entries = five()
    AuditEntry.objects.filter(pk__in=[entries[0].pk, entries[1].pk]).delete()
    assert audit.verify().broken_id == entries[2].pk


def test_details_come_back_from_the_database_with_the_same_hash() -> None:
    audit.record(
        "system",
        "s",
        "odd",
        detail={"big": 1e20, "gap": 0.1, "one": 1.0, "when": T0, "pair": (1, 2), 3: "int key"},
        ip="::FFFF:10.0.0.1",
    )
    audit.record("system", "s", "odd", ip="not an address")
    assert audit.verify().ok
    assert list(AuditEntry.objects.values_list("ip", flat=True)) == ["::ffff:10.0.0.1", None]


def test_an_entry_recorded_in_a_transaction_that_rolls_back_leaves_no_gap() -> None:
    audit.record("user", "ann", "login")
    with pytest.raises(RuntimeError), transaction.atomic():
        audit.record("user", "ann", "paused", "e/1")
        raise RuntimeError("the change failed")
    audit.record("user", "ann", "logout")
    assert audit.verify() == (True, 2, None, audit.verify().message)


def test_an_unknown_actor_type_is_refused() -> None:
    with pytest.raises(ValueError, match="actor_type"):
        audit.record("robot", "r2", "login")


@pytest.mark.django_db(transaction=True)
def test_concurrent_appends_never_fork_the_chain() -> None:
    threads, per_thread = 8, 15
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def append(n: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                if i % 3:
                    audit.record("system", f"writer-{n}", "tick", detail={"i": i})
                else:  # inside an outer transaction that goes on after the append
                    with transaction.atomic():
                        audit.record("system", f"writer-{n}", "tick", detail={"i": i})
                        AuditEntry.objects.count()
        except BaseException as error:
            errors.append(error)
        finally:
            connection.close()

    workers = [threading.Thread(target=append, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert errors == []
    total = threads * per_thread
    assert audit.verify().ok
    assert audit.verify().checked == total
    assert AuditEntry.objects.values("prev_hash").distinct().count() == total


# -- what is audited ---------------------------------------------------------------------------


def test_sign_in_sign_out_and_failed_sign_in_are_audited_with_the_address(
    django_user_model: Any,
) -> None:
    django_user_model.objects.create_user("ann", password="x" * 12)
    client = Client(REMOTE_ADDR="192.0.2.7")
    client.post("/login/", {"username": "ann", "password": "wrong-password"})
    client.post("/login/", {"username": "ann", "password": "x" * 12})
    client.post("/logout/")
    rows = list(AuditEntry.objects.values_list("actor_type", "actor", "action", "ip"))
    assert rows == [
        ("user", "ann", "login-failed", "192.0.2.7"),
        ("user", "ann", "login", "192.0.2.7"),
        ("user", "ann", "logout", "192.0.2.7"),
    ]
    assert "wrong-password" not in str(list(AuditEntry.objects.values_list("detail", flat=True)))
    assert audit.verify().ok


def test_agent_tokens_issued_and_revoked_are_audited_and_stored_hashed() -> None:
    token = actions.issue_agent_token("web-1", by="cli:ops")
    assert actions.revoke_agent_tokens("web-1", by="cli:ops") == 1
    rows = list(AuditEntry.objects.values_list("actor_type", "actor", "action", "target"))
    assert rows == [
        ("system", "cli:ops", "agent-token-issued", "web-1"),
        ("system", "cli:ops", "agent-token-revoked", "web-1"),
    ]
    assert AuditEntry.objects.last().detail == {"count": 1}
    for entry in AuditEntry.objects.all():
        assert token not in str(entry.detail)
    assert list(AgentToken.objects.values_list("digest", flat=True)) == [digest(token)]


def hello(agent: str) -> protocol.Hello:
    return protocol.Hello(
        agent=agent, elections=[protocol.ElectionInfo(name="e/1", backend="raft", ttl=1)]
    )


def won(seq: int, token: int, at: int = 0) -> protocol.Event:
    return protocol.Event.model_validate(
        {
            "seq": seq,
            "election": "e/1",
            "from": "candidate",
            "to": "leader",
            "token": token,
            "at": T0 + timedelta(seconds=at),
        }
    )


def test_every_new_term_is_audited_once_as_a_leader_change() -> None:
    actions.register_agent(hello("a"))
    actions.register_agent(hello("b"))
    actions.ingest_events("a", [won(1, 5)])
    actions.ingest_events("a", [won(1, 5)])  # a replay: no news
    actions.ingest_events("b", [won(1, 6, at=3)])
    actions.ingest_events("a", [won(2, 4, at=1)])  # older than the seat: history, not news
    changes = AuditEntry.objects.filter(action="leader-changed")
    assert [(e.actor_type, e.actor, e.target, e.detail) for e in changes] == [
        (
            "agent",
            "a",
            "e/1",
            {
                "leader": "a",
                "token": 5,
                "previous_leader": None,
                "previous_token": None,
                "gap": None,
                "agent_time": T0.isoformat(),
            },
        ),
        (
            "agent",
            "b",
            "e/1",
            {
                "leader": "b",
                "token": 6,
                "previous_leader": "a",
                "previous_token": 5,
                "gap": None,  # a never said when it left, nor reported a lease
                "agent_time": (T0 + timedelta(seconds=3)).isoformat(),
            },
        ),
    ]
    assert audit.verify().ok


def test_a_leader_change_costs_one_insert_under_the_lock() -> None:
    actions.register_agent(hello("a"))
    with CaptureQueriesContext(connection) as queries:
        actions.ingest_events("a", [won(1, 5), won(2, 6, at=1), won(3, 7, at=2)])
    sql = [q["sql"] for q in queries.captured_queries]
    audit_sql = [q for q in sql if "auditentry" in q or "advisory" in q]
    # One lock (PostgreSQL), one read of the head, one insert of all three entries, at the end.
    assert len(audit_sql) == (3 if connection.vendor == "postgresql" else 2)
    assert audit_sql[-1].startswith('INSERT INTO "elections_auditentry"')
    assert sql.index(audit_sql[-1]) >= len(sql) - 2
    assert AuditEntry.objects.filter(action="leader-changed").count() == 3


def test_the_admin_shows_entries_but_cannot_change_them(django_user_model: Any) -> None:
    client = Client()
    client.force_login(django_user_model.objects.create_superuser("root", password="x" * 12))
    entry = AuditEntry.objects.get()  # the sign-in
    assert client.get("/admin/elections/auditentry/").status_code == 200
    assert client.get("/admin/elections/auditentry/add/").status_code == 403
    assert client.post(f"/admin/elections/auditentry/{entry.pk}/delete/").status_code == 403
    client.post(f"/admin/elections/auditentry/{entry.pk}/change/", {"actor": "mallory"})
    assert audit.verify().ok


def test_deleting_the_newest_entries_is_caught_by_a_head_published_earlier(tmp_path) -> None:
    heads = tmp_path / "audit-heads.ndjson"
    for i in range(3):
        audit.record("system", "test", "paused", f"e/{i}")
    first = audit.publish_head(heads)
    assert first is not None
    assert audit.publish_head(heads, first[1]) == first  # unchanged: nothing appended
    audit.record("system", "test", "resumed", "e/3")
    audit.publish_head(heads, first[1])
    assert [h for _, h in audit.read_heads(heads)] == [first[1], audit.head()[1]]
    call_command("verify_audit", "--heads-file", str(heads), stdout=open("/dev/null", "w"))  # noqa: SIM115

    AuditEntry.objects.filter(pk=audit.head()[0]).delete()  # the end of the log, gone
    assert audit.verify().ok  # the chain alone cannot tell
    with pytest.raises(CommandError) as info:
        call_command("verify_audit", "--heads-file", str(heads), stdout=open("/dev/null", "w"))  # noqa: SIM115
    assert "no longer in the log" in str(info.value)
    with pytest.raises(CommandError):
        call_command("verify_audit", "--head", "f" * 64, stdout=open("/dev/null", "w"))  # noqa: SIM115
