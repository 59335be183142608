from django.core.management.base import BaseCommand, CommandError, CommandParser

from elections import actions, audit
from elections.models import Agent


class Command(BaseCommand):
    help = (
        "Revoke every token of an agent. Its sockets are closed within a second on every "
        "server process, and it is refused until it gets a new token."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("agent_id")

    def handle(self, *args: object, agent_id: str, **options: object) -> None:
        if not Agent.objects.filter(pk=agent_id).exists():
            raise CommandError(f"no agent {agent_id!r}")
        count = actions.revoke_agent_tokens(agent_id, by=audit.cli_actor())
        self.stdout.write(f"revoked {count} token(s) of {agent_id}")
