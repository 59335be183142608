"""Prometheus metrics of one agent, read from its runners at scrape time.

Written in the text exposition format (version 0.0.4) by hand: four gauges do not justify
prometheus_client in the agent, which costs about 1.3 MB of RSS and 40 modules at start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.runner import ElectionRunner

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Gauge:
    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        self.samples: list[tuple[dict[str, str], float]] = []

    def add(self, value: float, **labels: str) -> None:
        self.samples.append((labels, float(value)))

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        for labels, value in self.samples:
            # Sorted label names, as prometheus_client writes them (and as the tests read).
            pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            yield f"{self.name}{{{pairs}}} {value!r}" if pairs else f"{self.name} {value!r}"


class AgentMetrics:
    def __init__(
        self, runners: Callable[[], Iterable[ElectionRunner]], spool_depth: Callable[[], int]
    ) -> None:
        self.runners = runners
        self.spool_depth = spool_depth

    def gauges(self) -> list[Gauge]:
        leader = Gauge("electorate_agent_is_leader", "1 when this agent leads the election")
        token = Gauge("electorate_agent_fencing_token", "Last fencing token seen")
        changes = Gauge("electorate_agent_leaderships_total", "Times this agent won the election")
        for runner in self.runners():
            labels = {"election": runner.name, "backend": runner.config.backend}
            leader.add(1.0 if runner.is_leader() else 0.0, **labels)
            token.add(runner.token or 0, **labels)
            changes.add(runner.leader_changes, **labels)
        spool = Gauge("electorate_agent_spool_events", "Events not yet acked")
        spool.add(self.spool_depth())
        return [leader, token, changes, spool]

    def render(self) -> bytes:
        return "".join(f"{line}\n" for g in self.gauges() for line in g.lines()).encode()
