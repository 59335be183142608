"""The leader map at fleet size: problems first, pages, groups, and updates that redraw only
what changed, rendered once for every browser showing the same view."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

import protocol
from dashboard.web import leadermap, live
from dashboard.web.leadermap import MapFilter, MapView
from elections import actions
from elections.models import Election

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def fleet(n: int, *, cluster: str = "eu-1", backend: str = "raft", agent: str = "a") -> list[str]:
    names = [f"svc-{i:04d}/{cluster}" for i in range(n)]
    actions.register_agent(
        protocol.Hello(
            agent=agent,
            elections=[
                protocol.ElectionInfo(name=x, backend=backend, ttl=1, labels={"cluster": cluster})
                for x in names
            ],
        )
    )
    return names


def lead(agent: str, names: list[str], token: int = 1, first_seq: int = 1) -> None:
    actions.ingest_events(
        agent,
        [
            protocol.Event.model_validate(
                {
                    "seq": first_seq + i,
                    "election": n,
                    "from": "candidate",
                    "to": "leader",
                    "token": token,
                    "at": T0,
                }
            )
            for i, n in enumerate(names)
        ],
    )


def ids(names: list[str]) -> set[int]:
    return set(Election.objects.filter(name__in=names).values_list("pk", flat=True))


def test_problems_come_first_by_severity_then_name() -> None:
    names = fleet(10)
    lead("a", names[:8])
    Election.objects.filter(name=names[5]).update(status="split-brain")
    actions.agent_disconnected("b")  # nobody: no change
    attention, total = leadermap.attention_ids(MapFilter())
    shown = list(Election.objects.filter(pk__in=attention).values_list("name", flat=True))
    assert total == 3
    order = {pk: i for i, pk in enumerate(attention)}
    by_name = dict(Election.objects.filter(pk__in=attention).values_list("name", "pk"))
    assert order[by_name[names[5]]] == 0  # split-brain before the leaderless ones
    assert sorted(shown) == sorted([names[5], names[8], names[9]])
    actions.agent_disconnected("a")  # every leader now unverified
    _, total = leadermap.attention_ids(MapFilter())
    assert total == 10


def test_the_attention_list_is_capped_and_counts_the_rest() -> None:
    fleet(leadermap.ATTENTION_LIMIT + 7)
    attention, total = leadermap.attention_ids(MapFilter())
    assert (len(attention), total) == (leadermap.ATTENTION_LIMIT, leadermap.ATTENTION_LIMIT + 7)
    html = leadermap.snapshot(MapView()).parts[1]
    assert "and 7 more" in html


def test_pages_hold_page_size_rows_in_name_order() -> None:
    names = fleet(leadermap.PAGE_SIZE + 30)
    first, total = leadermap.page_ids(MapView())
    second, _ = leadermap.page_ids(MapView(page=2))
    assert total == len(names) and len(first) == leadermap.PAGE_SIZE and len(second) == 30
    ordered = list(Election.objects.order_by("name").values_list("pk", flat=True))
    assert list(first + second) == ordered


def test_groups_count_by_cluster_and_backend_with_problems_first() -> None:
    eu = fleet(5, cluster="eu-1", agent="a")
    fleet(3, cluster="us-1", backend="etcd", agent="b")
    lead("a", eu)
    rows, more = leadermap.groups(MapFilter())
    assert more == 0
    assert [(r["cluster"], r["backend"], r["total"], r["led"], r["leaderless"]) for r in rows] == [
        ("us-1", "etcd", 3, 0, 3),
        ("eu-1", "raft", 5, 5, 0),
    ]
    assert "label=cluster%3Dus-1" in rows[0]["query"]


def test_labels_filter_on_every_database() -> None:
    fleet(2, cluster="eu-1", agent="a")
    fleet(3, cluster="us-1", agent="b")
    only = MapFilter(label="cluster=us-1").apply(Election.objects.all())
    assert only.count() == 3


def test_an_update_redraws_only_changed_rows_on_screen() -> None:
    names = fleet(leadermap.PAGE_SIZE + 10)
    lead("a", names)
    view = MapView()
    state = leadermap.snapshot(view).state
    on_page, off_page = names[3], names[-1]

    lead("a", [on_page, off_page], token=2, first_seq=len(names) + 1)
    [rendered] = leadermap.update(ids([on_page, off_page]), {(view, state)}).values()
    rows = [p for p in rendered.parts if p.startswith("<tr")]
    assert len(rows) == 1 and on_page in rows[0] and "hx-swap-oob" in rows[0]
    assert not any("election-rows" in p for p in rendered.parts)  # no page redraw
    assert rendered.state == state


def test_an_update_costs_the_same_queries_for_one_change_or_many() -> None:
    names = fleet(300)
    lead("a", names)
    views = [MapView(), MapView(page=2), MapView(MapFilter(status="leaderless"))]
    targets = {(v, leadermap.snapshot(v).state) for v in views}

    def cost(changed: list[str]) -> int:
        with CaptureQueriesContext(connection) as queries:
            leadermap.update(ids(changed), targets)
        return len(queries.captured_queries)

    one = cost(names[:1])
    assert cost(names[:99]) == one  # all on page 1: the same plan, whatever the number
    # Changes on other pages cost at most a page look-up per view, never a query per row.
    assert cost(names[:250]) <= one + 2 * len(views)


def test_each_changed_row_is_rendered_once_for_any_number_of_views() -> None:
    names = fleet(20)
    lead("a", names)
    states = {(MapView(MapFilter(q=f"{'svc'[:k]}")), None) for k in range(1, 4)}
    targets = {(view, leadermap.snapshot(view).state) for view, _ in states}
    rendered = leadermap.update(ids(names[:2]), targets)
    first, *others = [r.parts for r in rendered.values()]
    for parts in others:  # the very same strings: rendered once, shared
        shared = [p for p in parts if p.startswith("<tr")]
        assert all(any(p is q for q in first) for p in shared)


def test_frames_stay_under_the_limit_and_keep_table_parts_apart() -> None:
    names = fleet(leadermap.PAGE_SIZE)
    lead("a", names)
    parts = leadermap.snapshot(MapView()).parts
    limit = 8 * 1024
    frames = live.pack(parts, limit)
    assert len(frames) > 3
    assert all(len(f.encode()) <= limit for f in frames)
    for text in frames:
        table = text.lstrip().startswith(("<tr", "<tbody"))
        assert ("<div" in text or "<section" in text or "<nav" in text) != table
    body = "".join(f for f in frames if f.startswith("<tbody"))
    assert body.count("<tr id=") == leadermap.PAGE_SIZE


def test_a_row_update_never_shares_a_frame_with_a_table_body() -> None:
    # In the <template> htmx parses a frame in, a <tr> after a </tbody> lands in an implied
    # body without hx-swap-oob: the row update is dropped (htmx:oobErrorNoTarget). This is
    # what an update looks like when the attention list and a page row change together.
    body = '<tbody hx-swap-oob="beforeend:#attention-rows"><tr id="attention-9"></tr></tbody>'
    row = '<tr id="election-9" hx-swap-oob="true"></tr>'
    frames = live.pack(["<div id='summary'></div>", body, body, row, row, body], 8 * 1024)
    assert frames == ["<div id='summary'></div>", body + body, row + row, body]
