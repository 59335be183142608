"""``manage.py ctl``: list elections, show history, step down, pause — like patronictl."""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from elections import commands, delivery
from elections.models import Command as ElectionCommand
from elections.models import Election
from elections.times import parse_until, parse_when


class Command(BaseCommand):
    help = "Operate elections from the shell: list, history, step-down, switchover, pause, resume."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("list", help="every election with its leader and status")
        history = sub.add_parser("history", help="terms of one election")
        history.add_argument("election")
        for verb in ElectionCommand.Kind.values:
            p = sub.add_parser(verb, help=f"{verb} the leader of an election")
            p.add_argument("election")
            p.add_argument("--reason", default="")
            p.add_argument(
                "--dry-run",
                action="store_true",
                help="say whether it would be sent and who could take over; send nothing",
            )
            p.add_argument(
                "--user", required=True, help="the operator acting (for permissions and audit)"
            )
            p.add_argument("--force", action="store_true")
            p.add_argument("--drill", action="store_true")
            p.add_argument("--wait", type=float, default=30.0)
            if verb == ElectionCommand.Kind.SWITCHOVER:
                p.add_argument("--to", dest="successor", required=True)
                p.add_argument("--at", help="ISO time to schedule it")
        for verb in ("pause", "resume"):
            p = sub.add_parser(verb)
            p.add_argument("election")
            p.add_argument("--user", required=True)
            p.add_argument("--reason", default="")
            if verb == "pause":
                p.add_argument("--until", help="end of the window: a UTC time, or 90m, 2h, 1d")

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        if action == "list":
            self._list()
        elif action == "history":
            self._history(options["election"])
        else:
            self._operate(action, options)

    def _list(self) -> None:
        rows = [("ELECTION", "BACKEND", "STATUS", "LEADER", "TERM", "MEMBERS")]
        for e in Election.objects.select_related("leader").prefetch_related("memberships"):
            members = ",".join(f"{m.agent_id}:{m.state}" for m in e.memberships.all())
            rows.append(
                (e.name, e.backend, e.status, e.leader_id or "-", str(e.token or "-"), members)
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            self.stdout.write(
                "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            )

    def _history(self, name: str) -> None:
        election = Election.objects.filter(name=name).first()
        if election is None:
            raise CommandError(f"unknown election {name!r}")
        for t in election.terms.all()[:50]:
            ended = t.ended.isoformat() if t.ended else "current"
            gap = f"gap {t.gap:.3f}s" if t.gap is not None else "gap ?"
            self.stdout.write(
                f"{t.token:>8}  {t.leader_id:<20} {t.started.isoformat()}  {gap:<12} {ended}  "
                f"{t.end_reason}".rstrip()
            )

    def _operate(self, action: str, options: dict[str, Any]) -> None:
        user = get_user_model().objects.filter(username=options["user"]).first()
        if user is None:
            raise CommandError(f"no user {options['user']!r}")
        try:
            if action in ("pause", "resume"):
                until = parse_until(options.get("until") or "")
                commands.set_paused(
                    user, options["election"], action == "pause", options["reason"], until=until
                )
                line = f"{options['election']}: {action}d"
                self.stdout.write(line + (f" until {until.isoformat()}" if until else ""))
                return
            wanted = commands.Request(
                election=options["election"],
                reason=options["reason"],
                successor=options.get("successor") or "",
                force=options["force"],
                drill=options["drill"],
                at=parse_when(options.get("at") or ""),
            )
            if options["dry_run"]:
                self._dry_run(commands.dry_run(user, wanted))
                return
            if not wanted.reason.strip():
                raise CommandError("--reason is required (it goes to the audit log)")
            command = commands.request_stepdown(user, wanted)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        except commands.Refused as refused:
            raise CommandError(f"refused: {refused.message}") from None
        command = async_to_sync(delivery.wait_final)(command.pk, options["wait"])
        line = f"command {command.pk}: {command.status}"
        if command.result:
            line += f": {command.result}"
        if command.leaderless_gap is not None:
            line += f" (leaderless gap {command.leaderless_gap:.3f}s)"
        self.stdout.write(line)
        if command.status in (ElectionCommand.Status.FAILED, ElectionCommand.Status.EXPIRED):
            raise CommandError(line)

    def _dry_run(self, run: commands.DryRun) -> None:
        """Every member and why it could not take over; exit 1 when it would be refused."""
        for c in run.candidates:
            verdict = "could take over" if c.eligible else "no: " + "; ".join(c.reasons)
            self.stdout.write(f"{c.agent:<20} {c.state or '-':<10} {verdict}")
        if run.refused:
            raise CommandError(f"dry run: {run.kind} would be refused: {run.refused.message}")
        self.stdout.write(f"dry run: {run.kind} would be sent (nothing was sent)")
