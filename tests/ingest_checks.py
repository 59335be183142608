"""What the ingest tests check alike: the instant their events are timed from, and a term
superseded by a newer token."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from elections.models import Election, Term

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def assert_superseded(leader: str, token: int, old: str, old_token: int, at: int) -> None:
    """``leader`` holds the only election with ``token``; ``old``'s term ``old_token`` ended
    ``at`` seconds after T0, superseded."""
    election = Election.objects.get()
    assert (election.leader_id, election.token) == (leader, token)
    term = Term.objects.get(token=old_token)
    assert (term.leader_id, term.ended, term.end_reason) == (
        old,
        T0 + timedelta(seconds=at),
        "superseded",
    )
