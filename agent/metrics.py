"""Prometheus metrics of one agent, read from its runners at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from agent.runner import ElectionRunner


class RunnerCollector:
    def __init__(
        self, runners: Callable[[], Iterable[ElectionRunner]], spool_depth: Callable[[], int]
    ) -> None:
        self.runners = runners
        self.spool_depth = spool_depth

    def collect(self) -> Iterable[Metric]:
        leader = GaugeMetricFamily(
            "electorate_agent_is_leader",
            "1 when this agent leads the election",
            labels=["election", "backend"],
        )
        token = GaugeMetricFamily(
            "electorate_agent_fencing_token",
            "Last fencing token seen",
            labels=["election", "backend"],
        )
        changes = GaugeMetricFamily(
            "electorate_agent_leaderships_total",
            "Times this agent won the election",
            labels=["election", "backend"],
        )
        for runner in self.runners():
            labels = [runner.name, runner.config.backend]
            leader.add_metric(labels, 1.0 if runner.is_leader() else 0.0)
            token.add_metric(labels, float(runner.token or 0))
            changes.add_metric(labels, float(runner.leader_changes))
        yield leader
        yield token
        yield changes
        yield GaugeMetricFamily(
            "electorate_agent_spool_events", "Events not yet acked", value=self.spool_depth()
        )


def make_registry(collector: RunnerCollector) -> Callable[[], bytes]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    return lambda: generate_latest(registry)
