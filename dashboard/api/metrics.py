"""``GET /metrics``: Prometheus text for the whole fleet, read at scrape time.

Scrape it with an API token (``Authorization: Bearer``): it names every election.

Typed as prometheus-client's conventions ask, and bounded for a fleet of 5,000 elections
(see docs/metrics.md): per-election series only where a question is about one election and
its answer changes rarely (leader changes, a counter for every election; leaderless seconds
and flapping, gauges only for the elections in that state); the failover gap histogram and
everything else carry small labels only (backend, status, command kind). Counters come from
rows that are never deleted (terms, finished commands) or from ``elections.meters``, never
from in-process memory, so they never go back down and every process answers alike. A
scrape costs the same fixed number of queries whatever the size of the fleet.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db.models import Count, Q, Sum
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from dashboard.auth import api_auth
from elections import meters
from elections.models import Agent, Command, Election, Term

#: Upper bounds (seconds) of the failover gap histogram: a resign hands over in well under a
#: second, a crashed leader costs about its TTL (1-30 s for the backends we run).
GAP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0)


def _buckets(bounds: Iterable[float], counts: Iterable[float], total: float) -> list:
    return [
        *((floatToGoString(b), c) for b, c in zip(bounds, counts, strict=True)),
        ("+Inf", total),
    ]


class FleetCollector:
    def collect(self) -> Iterable[Metric]:
        now = timezone.now()
        status = GaugeMetricFamily(
            "electorate_elections", "Elections by status", labels=["status", "backend"]
        )
        for row in Election.objects.values("status", "backend").annotate(n=Count("pk")):
            status.add_metric([row["status"], row["backend"]], row["n"])
        yield status

        leaderless = GaugeMetricFamily(
            "electorate_leaderless_seconds",
            "How long each leaderless election has had no leader (leaderless elections only)",
            labels=["election"],
        )
        for name, since in Election.objects.filter(
            status=Election.Status.LEADERLESS, leaderless_since__isnull=False
        ).values_list("name", "leaderless_since"):
            leaderless.add_metric([name], (now - since).total_seconds())
        yield leaderless

        flapping = GaugeMetricFamily(
            "electorate_flapping",
            "1 while an election flaps: more leader changes in the window than allowed "
            "(flapping elections only)",
            labels=["election"],
        )
        for name in Election.objects.filter(flapping_since__isnull=False).values_list(
            "name", flat=True
        ):
            flapping.add_metric([name], 1)
        yield flapping

        changes = CounterMetricFamily(
            "electorate_leader_changes",
            "Leader changes: terms started (a new fencing token), per election",
            labels=["election", "backend"],
        )
        for name, backend, n in Election.objects.annotate(n=Count("terms")).values_list(
            "name", "backend", "n"
        ):
            changes.add_metric([name, backend], n)
        yield changes

        gap = HistogramMetricFamily(
            "electorate_failover_gap_seconds",
            "Leaderless time of each leader change with a known gap, from the old leader's "
            "last proven lease to the new win (all terms), per backend",
            labels=["backend"],
        )
        per_bucket = {
            f"le{i}": Count("pk", filter=Q(gap__lte=b)) for i, b in enumerate(GAP_BUCKETS)
        }
        for row in (
            Term.objects.filter(gap__isnull=False)
            .values("election__backend")
            .annotate(n=Count("pk"), total=Sum("gap"), **per_bucket)
            .order_by("election__backend")
        ):
            counts = [row[f"le{i}"] for i in range(len(GAP_BUCKETS))]
            gap.add_metric(
                [row["election__backend"]],
                _buckets(GAP_BUCKETS, counts, row["n"]),
                sum_value=row["total"] or 0.0,
            )
        yield gap

        agents = GaugeMetricFamily(
            "electorate_agents", "Agents by connection", labels=["connected"]
        )
        for row in Agent.objects.values("connected").annotate(n=Count("pk")):
            agents.add_metric([str(row["connected"]).lower()], row["n"])
        yield agents

        outcomes = CounterMetricFamily(
            "electorate_commands",
            "Step-down and switchover commands finished, by outcome",
            labels=["kind", "outcome"],
        )
        in_flight = GaugeMetricFamily(
            "electorate_commands_open",
            "Step-down and switchover commands scheduled or on their way",
            labels=["kind", "status"],
        )
        for row in Command.objects.values("kind", "status").annotate(n=Count("pk")):
            final = row["status"] in Command.FINAL
            (outcomes if final else in_flight).add_metric([row["kind"], row["status"]], row["n"])
        yield outcomes
        yield in_flight

        totals = meters.totals()
        yield CounterMetricFamily(
            "electorate_ingest_frames",
            "Events frames committed, every server process",
            value=totals[meters.FRAMES],
        )
        yield CounterMetricFamily(
            "electorate_ingest_events",
            "Events received in committed frames (replays included), every server process",
            value=totals[meters.EVENTS],
        )
        yield CounterMetricFamily(
            "electorate_transitions_ingested",
            "Agent transitions stored (new events), every server process",
            value=totals[meters.STORED],
        )
        lag = HistogramMetricFamily(
            "electorate_ingest_lag_seconds",
            "From a frame's arrival at a server process to its commit (the agent's ack)",
        )
        lag.add_metric(
            [],
            _buckets(
                meters.LAG_BUCKETS,
                [totals[f"ingest_lag_le:{b}"] for b in meters.LAG_BUCKETS],
                totals[meters.LAG_COUNT],
            ),
            sum_value=totals[meters.LAG_SUM],
        )
        yield lag


_registry = CollectorRegistry(auto_describe=False)
_registry.register(FleetCollector())  # type: ignore[arg-type]


@api_auth
def metrics(request: HttpRequest) -> HttpResponse:
    return HttpResponse(generate_latest(_registry), content_type=CONTENT_TYPE_LATEST)
