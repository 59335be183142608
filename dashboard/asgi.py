"""ASGI entry point: HTTP through Django, websockets through Channels.

``/ws/agent/`` authenticates with a bearer token (agents send no Origin); ``/ws/live/`` is
for logged-in browsers and checks the Origin against ALLOWED_HOSTS.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dashboard.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402 - needs Django set up
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import path  # noqa: E402

from dashboard.web.consumers import LiveConsumer  # noqa: E402
from elections.consumers import AgentConsumer  # noqa: E402
from elections.ticker import start_ticker  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter(
            [
                path("ws/agent/", AgentConsumer.as_asgi()),
                path(
                    "ws/live/",
                    AllowedHostsOriginValidator(AuthMiddlewareStack(LiveConsumer.as_asgi())),
                ),
            ]
        ),
    }
)
start_ticker()
