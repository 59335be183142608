"""The /audit/ page, /api/v1/audit and the streamed CSV / NDJSON exports."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.http import StreamingHttpResponse
from django.test import AsyncClient, Client

from dashboard import exports
from elections import audit
from elections.models import Agent, AuditEntry, Election, Term, Transition

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def sre(django_user_model: Any) -> Client:
    client = Client()
    client.force_login(django_user_model.objects.create_user("sre", password="x" * 12))
    AuditEntry.objects.all().delete()  # the sign-in's own entry: each test starts empty
    return client


def entry(at: datetime, actor: str, action: str, target: str = "", **detail: Any) -> AuditEntry:
    made = audit.record("user", actor, action, target, detail)
    AuditEntry.objects.filter(pk=made.pk).update(at=at)  # back-date (breaks the chain: fine)
    return made


@pytest.fixture
def log() -> list[AuditEntry]:
    return [
        entry(T0, "ann", "login"),
        entry(T0 + timedelta(hours=1), "ann", "step-down-requested", "billing/cluster", r="x"),
        entry(T0 + timedelta(days=1), "bob", "paused", "search/shard-1"),
        entry(T0 + timedelta(days=2), "bob", "logout"),
    ]


def history(transitions: int = 0) -> None:
    agent = Agent.objects.create(id="a")
    billing = Election.objects.create(name="billing/cluster")
    search = Election.objects.create(name="search/shard-1")
    Term.objects.create(election=billing, leader=agent, token=1, started=T0)
    Term.objects.create(election=search, leader=agent, token=2, started=T0 + timedelta(days=1))
    Transition.objects.bulk_create(
        Transition(
            agent=agent,
            election=billing if seq % 2 else search,
            seq=seq,
            from_state="candidate",
            to_state="leader",
            token=seq,
            agent_time=T0 + timedelta(seconds=seq),
            detail=f"won, {seq}",
        )
        for seq in range(1, transitions + 1)
    )


def body(response: Any) -> str:
    assert isinstance(response, StreamingHttpResponse)
    return b"".join(response.streaming_content).decode()


# -- the page ------------------------------------------------------------------------------


def test_the_audit_page_needs_a_login(client: Client) -> None:
    assert client.get("/audit/").status_code == 302
    assert client.get("/audit/export.csv").status_code == 302


def test_the_audit_page_lists_newest_first_and_filters(sre: Client, log: Any) -> None:
    page = sre.get("/audit/").content.decode()
    assert page.index("<td>logout<") < page.index("<td>paused<") < page.index("<td>step-down")
    assert 'href="/audit/"' in sre.get("/").content.decode()  # in the header nav
    only_bob = sre.get("/audit/", {"actor": "bob"}).content.decode()
    assert "<td>paused<" in only_bob and "<td>step-down-requested<" not in only_bob
    assert "/audit/export.csv?actor=bob" in only_bob
    assert "/audit/export.ndjson?actor=bob" in only_bob
    day = sre.get("/audit/", {"from": "2026-11-01", "to": "2026-11-01"}).content.decode()
    assert "<td>step-down-requested<" in day and "<td>paused<" not in day


def test_the_audit_page_pages_by_100(sre: Client) -> None:
    audit.record_many(audit.Pending("system", "s", f"tick-{i}") for i in range(150))
    first = sre.get("/audit/")
    assert first.content.decode().count("tick-") == 100
    older = first.context["older"]
    assert older
    second = sre.get(f"/audit/?{older}").content.decode()
    assert second.count("tick-") == 50 and "tick-49<" in second and "tick-50<" not in second
    assert "older" not in second.split("</table>")[1]


def test_a_bad_filter_is_a_400_with_the_reason(sre: Client) -> None:
    page = sre.get("/audit/", {"from": "yesterday"})
    assert page.status_code == 400
    assert "&#x27;from&#x27; must be an ISO 8601 date" in page.content.decode()
    export = sre.get("/transitions/export.csv", {"to": "2026-13-45"})
    assert export.status_code == 400
    assert export.content.decode().startswith("'to' must be an ISO 8601 date")
    api = sre.get("/api/v1/audit", {"from": "2026-11-02", "to": "2026-11-01"})
    assert (api.status_code, api.json()) == (
        400,
        {"error": "'from' (2026-11-02) must be before 'to' (2026-11-01)"},
    )
    assert sre.get("/api/v1/audit", {"limit": "1001"}).status_code == 400
    assert sre.get("/api/v1/audit", {"limit": "ten"}).json() == {
        "error": "'limit' must be a whole number, not 'ten'"
    }


# -- filters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-01", T0.replace(hour=0)),
        ("2026-11-01T12:00", T0),
        ("2026-11-01T12:00:00Z", T0),
        ("2026-11-01T13:00:00+01:00", T0),
        ("2026-11-01T13:00:00 01:00", T0),  # an unencoded "+" in a query string
        ("2026-11-01 12:00:00.000", T0),
    ],
)
def test_times_are_iso_8601_and_naive_means_utc(text: str, expected: datetime) -> None:
    assert exports.parse_time(text, "from") == expected


def test_a_date_as_the_end_includes_that_whole_day() -> None:
    assert exports.parse_time("2026-11-01", "to", end_of_day=True) == datetime(
        2026, 11, 2, tzinfo=UTC
    )


# -- the API -----------------------------------------------------------------------------------


def test_api_audit_is_newest_first_filtered_and_limited(sre: Client, log: Any) -> None:
    data = sre.get("/api/v1/audit", {"actor": "ann"}).json()
    assert [e["action"] for e in data["entries"]] == ["step-down-requested", "login"]
    assert data["entries"][0] == {
        "id": log[1].pk,
        "at": (T0 + timedelta(hours=1)).isoformat(),
        "actor_type": "user",
        "actor": "ann",
        "action": "step-down-requested",
        "target": "billing/cluster",
        "detail": {"r": "x"},
        "ip": None,
        "prev_hash": log[0].hash,
        "hash": log[1].hash,
    }
    page = sre.get("/api/v1/audit", {"limit": 3}).json()
    assert [e["action"] for e in page["entries"]] == ["logout", "paused", "step-down-requested"]
    rest = sre.get("/api/v1/audit", {"limit": 3, "before": page["next_before"]}).json()
    assert ([e["action"] for e in rest["entries"]], rest["next_before"]) == (["login"], None)
    by_election = sre.get("/api/v1/audit", {"election": "search/shard-1"}).json()
    assert [e["action"] for e in by_election["entries"]] == ["paused"]
    since = sre.get("/api/v1/audit", {"from": "2026-11-02T00:00:00Z"}).json()
    assert [e["action"] for e in since["entries"]] == ["logout", "paused"]


# -- exports ---------------------------------------------------------------------------------


def test_audit_csv_has_a_header_and_the_filtered_rows(sre: Client, log: Any) -> None:
    response = sre.get("/audit/export.csv", {"actor": "ann"})
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"].startswith('attachment; filename="electorate-audit-')
    rows = list(csv.DictReader(io.StringIO(body(response))))
    assert [(r["id"], r["action"], r["target"]) for r in rows] == [
        (str(log[0].pk), "login", ""),
        (str(log[1].pk), "step-down-requested", "billing/cluster"),
    ]
    assert json.loads(rows[1]["detail"]) == {"r": "x"}
    assert rows[1]["at"] == (T0 + timedelta(hours=1)).isoformat()


def test_an_audit_export_can_be_verified_on_its_own(sre: Client) -> None:
    for i in range(5):
        audit.record("user", "ann", "login", detail={"i": i, "f": 0.5}, ip="10.0.0.1")
    lines = body(sre.get("/audit/export.ndjson")).splitlines()
    prev = audit.GENESIS
    for line in lines:
        row = json.loads(line)
        copy = AuditEntry(**{**row, "at": datetime.fromisoformat(row["at"])})
        assert copy.prev_hash == prev
        assert audit.entry_hash(copy) == copy.hash
        prev = copy.hash


def test_transitions_and_terms_export_filtered_by_election_and_time(sre: Client) -> None:
    history(transitions=10)
    rows = list(
        csv.DictReader(
            io.StringIO(
                body(
                    sre.get(
                        "/transitions/export.csv",
                        {
                            "election": "billing/cluster",
                            "from": "2026-11-01T12:00:03Z",
                            "to": "2026-11-01T12:00:08Z",
                        },
                    )
                )
            )
        )
    )
    assert [(r["seq"], r["election"], r["detail"]) for r in rows] == [
        ("3", "billing/cluster", "won, 3"),
        ("5", "billing/cluster", "won, 5"),
        ("7", "billing/cluster", "won, 7"),
    ]
    assert list(rows[0]) == [
        "id",
        "election",
        "agent",
        "seq",
        "from",
        "to",
        "token",
        "leader",
        "agent_time",
        "received",
        "reason",
        "detail",
    ]
    terms = [json.loads(line) for line in body(sre.get("/terms/export.ndjson")).splitlines()]
    assert [(t["election"], t["token"], t["ended"]) for t in terms] == [
        ("billing/cluster", 1, None),
        ("search/shard-1", 2, None),
    ]
    later = body(sre.get("/terms/export.ndjson", {"from": "2026-11-02"})).splitlines()
    assert [json.loads(line)["election"] for line in later] == ["search/shard-1"]
    only = body(sre.get("/terms/export.csv", {"election": "billing/cluster"})).splitlines()
    assert only[0] == "id,election,leader,token,started,ended,end_reason,gap"
    assert len(only) == 2


def test_an_empty_csv_export_is_just_the_header(sre: Client) -> None:
    assert (
        body(sre.get("/terms/export.csv"))
        == "id,election,leader,token,started,ended,end_reason,gap\n"
    )
    assert body(sre.get("/transitions/export.ndjson")) == ""


def test_a_large_export_streams_with_few_queries(
    sre: Client, django_assert_max_num_queries: Any
) -> None:
    history(transitions=20_000)
    with django_assert_max_num_queries(4):  # session, user, the export's one cursor
        response = sre.get("/transitions/export.ndjson")
        assert isinstance(response, StreamingHttpResponse)
        chunks = iter(response.streaming_content)
        first = next(chunks)
        # The first chunk leaves before the rest is read: the body is never built whole.
        assert first.count(b"\n") == exports.CHUNK_ROWS
        rest = b"".join(chunks)
    lines = (first + rest).decode().splitlines()
    assert len(lines) == 20_000
    seqs = [json.loads(line)["seq"] for line in lines]
    assert seqs == list(range(1, 20_001))


def test_under_asgi_the_export_streams_too(django_user_model: Any) -> None:
    # Django reads a synchronous iterator whole before sending it under ASGI; the export
    # hands ASGI an asynchronous one instead.
    history(transitions=3 * exports.CHUNK_ROWS)
    client = AsyncClient()
    client.force_login(django_user_model.objects.create_user("sre", password="x" * 12))

    async def fetch() -> tuple[bool, list[bytes]]:
        response = await client.get("/transitions/export.csv")
        return response.is_async, [chunk async for chunk in response.streaming_content]

    is_async, chunks = async_to_sync(fetch)()
    assert is_async
    assert len(chunks) == 3  # the header with 500 rows, then 500, then 500
    assert b"".join(chunks).count(b"\n") == 1 + 3 * exports.CHUNK_ROWS


def test_csv_cells_that_would_run_as_formulas_are_defused(sre: Client) -> None:
    audit.record("user", "=cmd|' /C calc'!A0", "paused", "billing/cluster", {"reason": "@SUM(1)"})
    text = b"".join(sre.get("/audit/export.csv").streaming_content).decode()
    row = list(csv.reader(io.StringIO(text)))[-1]
    assert row[3] == "'=cmd|' /C calc'!A0"
    assert not any(cell.startswith(("=", "+", "-", "@")) for cell in row)
    ndjson = b"".join(sre.get("/audit/export.ndjson").streaming_content).decode()
    assert json.loads(ndjson.splitlines()[-1])["actor"] == "=cmd|' /C calc'!A0"  # as stored
