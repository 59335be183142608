"""The browser UI's pages, forms and exports (mounted at the site root)."""

from django.contrib.auth import views as auth_views
from django.urls import path

from dashboard.web import agents, audit, control, login, views

urlpatterns = [
    path("", views.leader_map, name="map"),
    path("elections/<path:name>/step-down", control.stepdown, name="stepdown"),
    path("elections/<path:name>/pause", control.pause, name="pause"),
    path("elections/<path:name>/forget", agents.forget_election, name="forget-election"),
    path("elections/<path:name>/", views.election_detail, name="election"),
    path("agents/", agents.agent_list, name="agents"),
    path("agents/<str:agent_id>/", agents.agent_detail, name="agent"),
    path("agents/<str:agent_id>/forget", agents.forget_agent, name="forget-agent"),
    path("memberships/<int:pk>/forget", agents.forget_membership, name="forget-membership"),
    path("commands/<int:pk>/cancel", control.cancel, name="cancel-command"),
    path("login/", login.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("audit/", audit.audit_log, name="audit"),
    *(
        path(
            f"{kind}/export.{fmt}",
            audit.export,
            {"kind": kind, "fmt": fmt},
            name=f"{kind}-export-{fmt}",
        )
        for kind in ("audit", "transitions", "terms")
        for fmt in ("csv", "ndjson")
    ),
]
