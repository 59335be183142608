from django.apps import AppConfig


class DemoConfig(AppConfig):
    """``manage.py demo``: a local fleet for trying Electorate; nothing the server runs."""

    name = "demo"
