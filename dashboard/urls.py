"""Each room lists its own URLs: the browser UI (``dashboard.web``), the JSON API and metrics
(``dashboard.api``), and Django's admin."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("", include("dashboard.api.urls")),
    path("", include("dashboard.web.urls")),
    path("admin/", admin.site.urls),
]
