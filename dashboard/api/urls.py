"""The JSON API (mounted at ``api/v1/``) and the Prometheus scrape (``/metrics``)."""

from django.urls import path

from dashboard.api import control, elections, metrics

urlpatterns = [
    path("api/v1/elections", elections.elections, name="api-elections"),
    path("api/v1/elections/<path:name>/terms", elections.terms, name="api-terms"),
    path("api/v1/elections/<path:name>/step-down", control.stepdown, name="api-stepdown"),
    path("api/v1/elections/<path:name>/pause", control.pause, name="api-pause"),
    path("api/v1/elections/<path:name>", elections.election, name="api-election"),
    path("api/v1/agents", elections.agents, name="api-agents"),
    path("api/v1/audit", elections.audit, name="api-audit"),
    path("metrics", metrics.metrics, name="metrics"),
]
