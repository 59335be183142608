"""Admin: the audit log is read-only here too (append-only; entries change only by tampering)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from elections.models import AuditEntry


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    list_display = ("id", "at", "actor_type", "actor", "action", "target", "ip")
    list_filter = ("actor_type", "action")
    search_fields = ("actor", "target")
    date_hierarchy = "at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
