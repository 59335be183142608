"""Forgetting what nobody speaks for any more: a zombie membership, an orphan election, an
offline agent (see ``elections.zombies``). Operators only; each audited and announced.

Each refuses (409) what is still alive, so a click on a stale page cannot drop a member that
reports, an election someone reports, or a connected agent.
"""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from elections import audit, statuses
from elections.broadcast import elections_changed
from elections.models import Agent, Election, Membership
from elections.permissions import Refused, User, actor, require_operator
from elections.serializers import iso
from elections.zombies import is_zombie, orphans


@transaction.atomic
def forget_membership(user: User, membership_id: int, ip: str | None = None) -> None:
    """Drop a zombie membership, or one of an offline agent."""
    require_operator(user)
    member = Membership.objects.select_related("agent", "election").filter(pk=membership_id).first()
    if member is None:
        raise Refused(404, f"no membership {membership_id}")
    list(statuses.locked([member.election_id]).values_list("pk"))  # ingest's lock order
    zombie = is_zombie(member.pk, timezone.now())
    if member.agent.connected and not zombie:
        raise Refused(
            409,
            f"{member.agent_id} still reports {member.election.name}; only a zombie membership "
            "or one of an offline agent can be forgotten",
        )
    member.delete()
    statuses.refresh([member.election_id])
    audit.record(
        audit.Actor.USER,
        actor(user),
        audit.Action.MEMBERSHIP_FORGOTTEN,
        member.election.name,
        {
            "agent": member.agent_id,
            "state": member.state,
            "zombie": zombie,
            "reported": iso(member.reported),
        },
        ip,
    )
    elections_changed([member.election_id])


@transaction.atomic
def forget_election(user: User, name: str, ip: str | None = None) -> None:
    """Delete an orphan election with its history (terms, transitions, commands)."""
    require_operator(user)
    election = Election.objects.filter(name=name).first()
    if election is None:
        raise Refused(404, f"unknown election {name!r}")
    list(statuses.locked([election.pk]).values_list("pk"))
    orphan = orphans().filter(pk=election.pk).values_list("last_report", flat=True).first()
    if orphan is None:
        raise Refused(
            409, f"{name} was reported recently; only an orphan election can be forgotten"
        )
    terms = election.terms.count()
    pk = election.pk
    election.delete()
    audit.record(
        audit.Actor.USER,
        actor(user),
        audit.Action.ELECTION_FORGOTTEN,
        name,
        {"backend": election.backend, "last_report": iso(orphan), "terms": terms},
        ip,
    )
    elections_changed([pk])


@transaction.atomic
def forget_agent(user: User, agent_id: str, ip: str | None = None) -> None:
    """Drop an offline agent's memberships and hide it; its row stays (terms name it), its
    tokens stay valid: a hello brings it back."""
    require_operator(user)
    agent = Agent.objects.select_for_update().filter(pk=agent_id, forgotten__isnull=True).first()
    if agent is None:
        raise Refused(404, f"no agent {agent_id!r}")
    if agent.connected:
        raise Refused(409, f"{agent_id} is connected; only an offline agent can be forgotten")
    ids = sorted(Membership.objects.filter(agent=agent).values_list("election_id", flat=True))
    if ids:
        list(statuses.locked(ids).values_list("pk"))
    Membership.objects.filter(agent=agent).delete()
    agent.forgotten = timezone.now()
    agent.save(update_fields=["forgotten"])
    if ids:
        statuses.refresh(ids)
    audit.record(
        audit.Actor.USER,
        actor(user),
        audit.Action.AGENT_FORGOTTEN,
        agent_id,
        {"memberships": len(ids), "last_seen": iso(agent.last_seen), "host": agent.hostname},
        ip,
    )
    elections_changed(ids)
