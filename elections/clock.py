"""Agents' clock skew against the dashboard, from their heartbeats' ``at``.

Each heartbeat gives one sample, agent time minus receive time (so the network delay counts
in, making a sample a little behind); the consumer smooths them (``smooth``) and the
liveness flush writes the result to ``Agent.clock_skew`` with the agent's last-seen time,
so measuring costs no statement of its own.
"""

from __future__ import annotations

from datetime import datetime

from django.conf import settings

#: Weight of a new sample: a few heartbeats move the estimate, one slow delivery does not.
SMOOTHING = 0.25


def sample(agent_time: datetime, received: datetime) -> float:
    return (agent_time - received).total_seconds()


def smooth(previous: float | None, value: float) -> float:
    return value if previous is None else previous + SMOOTHING * (value - previous)


def skewed(skew: float | None) -> bool:
    """Is this much skew worth flagging (``ELECTORATE_CLOCK_SKEW_WARN`` seconds either way)?"""
    return skew is not None and abs(skew) > settings.ELECTORATE_CLOCK_SKEW_WARN
