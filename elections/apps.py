from django.apps import AppConfig


class ElectionsConfig(AppConfig):
    name = "elections"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from elections import signals  # noqa: F401  (connects the audit receivers)
