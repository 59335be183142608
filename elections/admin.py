"""Admin: the audit log is read-only here too (append-only; entries change only by tampering);
webhooks are configured here, and their deliveries' outcomes shown (read-only)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import Count, OuterRef, Q, QuerySet, Subquery
from django.http import HttpRequest

from elections import webhooks
from elections.models import AuditEntry, Webhook, WebhookDelivery


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


class WebhookForm(forms.ModelForm):
    url = forms.URLField(
        assume_scheme="https", max_length=500, help_text=Webhook._meta.get_field("url").help_text
    )
    events = forms.MultipleChoiceField(
        choices=[c for c in Webhook.Kind.choices if c[0] != Webhook.Kind.TEST],
        widget=forms.CheckboxSelectMultiple,
        required=False,
        help_text="None ticked: this webhook receives nothing.",
    )

    class Meta:
        model = Webhook
        fields = ("name", "url", "secret", "events", "leaderless_after", "enabled")


@admin.register(Webhook)
class WebhookAdmin(admin.ModelAdmin):
    form = WebhookForm
    list_display = ("name", "url", "enabled", "kinds", "pending", "last_outcome", "failures")
    list_filter = ("enabled",)
    search_fields = ("name", "url")
    readonly_fields = ("failures", "busy_until", "created")
    actions = ("send_test",)

    def save_model(self, request: HttpRequest, obj: Webhook, form: Any, change: bool) -> None:
        # An operator who fixed the URL wants the pending events now, not after the backoff.
        obj.failures, obj.busy_until, obj.lease_owner = 0, None, ""
        super().save_model(request, obj, form, change)

    @admin.action(description="Send a test event")
    def send_test(self, request: HttpRequest, queryset: QuerySet[Webhook]) -> None:
        user = request.user.get_username()
        sent = webhooks.send_test(queryset.values_list("pk", flat=True), user)
        self.message_user(
            request, f"A test event is on its way to {sent} webhook(s): see Webhook deliveries."
        )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Webhook]:
        last = WebhookDelivery.objects.filter(webhook=OuterRef("pk")).order_by("-at", "-id")
        return (
            super()
            .get_queryset(request)
            .annotate(
                pending_count=Count("outbox", filter=Q(outbox__delivery__isnull=True)),
                last_at=Subquery(last.values("at")[:1]),
                last_status=Subquery(last.values("status_code")[:1]),
                last_error=Subquery(last.values("error")[:1]),
            )
        )

    @admin.display(description="events")
    def kinds(self, webhook: Webhook) -> str:
        return ", ".join(webhook.events) or "none"

    @admin.display(description="pending", ordering="pending_count")
    def pending(self, webhook: Any) -> int:
        return webhook.pending_count

    @admin.display(description="last delivery", ordering="last_at")
    def last_outcome(self, webhook: Any) -> str:
        if webhook.last_at is None:
            return "never"
        what = webhook.last_error or f"HTTP {webhook.last_status}"
        return f"{webhook.last_at:%Y-%m-%d %H:%M:%S} UTC: {what}"


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    """Every POST and how it went; written by the delivery only."""

    list_display = ("at", "webhook", "ok", "status_code", "attempt", "events", "ms", "error")
    list_filter = ("ok", "webhook")
    date_hierarchy = "at"
    list_select_related = ("webhook",)

    @admin.display(description="duration (ms)", ordering="duration")
    def ms(self, delivery: WebhookDelivery) -> int:
        return round(delivery.duration * 1000)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
