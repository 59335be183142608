from django.apps import AppConfig


class WebConfig(AppConfig):
    """The browser UI: pages, the live leader map, sign-in (audited through auth signals)."""

    name = "dashboard.web"
    label = "web"

    def ready(self) -> None:
        from dashboard.web import signals  # noqa: F401  (connects the audit receivers)
