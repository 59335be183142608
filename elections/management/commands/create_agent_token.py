from django.core.management.base import BaseCommand, CommandError, CommandParser

from elections import actions, audit
from protocol import AgentId


class Command(BaseCommand):
    help = "Issue a bearer token for an agent id. The token is printed once and stored hashed."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("agent_id")

    def handle(self, *args: object, agent_id: str, **options: object) -> None:
        from pydantic import TypeAdapter, ValidationError

        try:
            TypeAdapter(AgentId).validate_python(agent_id)
        except ValidationError:
            raise CommandError(
                f"invalid agent id {agent_id!r}: letters, digits, '.', '_' and '-' only"
            ) from None
        self.stdout.write(actions.issue_agent_token(agent_id, by=audit.cli_actor()))
