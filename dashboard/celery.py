"""The Celery app. Production: a worker and exactly one beat on Redis (see compose.yaml)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dashboard.settings")

app = Celery("electorate")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
app.conf.beat_schedule = {
    "sweep-stale-agents": {"task": "elections.tasks.sweep_stale_agents", "schedule": 5.0},
    "refresh-statuses": {"task": "elections.tasks.refresh_statuses", "schedule": 30.0},
}
