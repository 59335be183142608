"""``GET /metrics``: Prometheus text for the whole fleet, read from the database at scrape time.

Scrape it with an API token (``Authorization: Bearer``): it names every election.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dashboard.auth import api_auth
from elections.models import Agent, Command, Election, Term, Transition


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
            "How long each leaderless election has had no leader",
            labels=["election"],
        )
        for name, since in Election.objects.filter(
            status=Election.Status.LEADERLESS, leaderless_since__isnull=False
        ).values_list("name", "leaderless_since"):
            leaderless.add_metric([name], (now - since).total_seconds())
        yield leaderless

        changes = CounterMetricFamily(
            "electorate_leader_changes", "Terms started, per backend", labels=["backend"]
        )
        for row in Term.objects.values("election__backend").annotate(n=Count("pk")):
            changes.add_metric([row["election__backend"]], row["n"])
        yield changes

        agents = GaugeMetricFamily(
            "electorate_agents", "Agents by connection", labels=["connected"]
        )
        for row in Agent.objects.values("connected").annotate(n=Count("pk")):
            agents.add_metric([str(row["connected"]).lower()], row["n"])
        yield agents

        commands = CounterMetricFamily(
            "electorate_commands", "Step-down and switchover commands", labels=["kind", "status"]
        )
        for row in Command.objects.values("kind", "status").annotate(n=Count("pk")):
            commands.add_metric([row["kind"], row["status"]], row["n"])
        yield commands

        yield CounterMetricFamily(
            "electorate_transitions_ingested",
            "Agent transitions stored",
            value=Transition.objects.count(),
        )


_registry = CollectorRegistry(auto_describe=False)
_registry.register(FleetCollector())  # type: ignore[arg-type]


@api_auth
def metrics(request: HttpRequest) -> HttpResponse:
    return HttpResponse(generate_latest(_registry), content_type=CONTENT_TYPE_LATEST)
