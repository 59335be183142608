"""The Celery app. Production: a worker and exactly one beat on Redis (see compose.yaml)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dashboard.settings")

app = Celery("electorate")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_after_finalize.connect
def _schedule(sender: Celery, **kwargs: object) -> None:
    from elections.tasks import PERIODIC

    for task, seconds in PERIODIC:
        sender.add_periodic_task(seconds, task.s(), name=task.name)
