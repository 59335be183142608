from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from elections import actions, audit


class Command(BaseCommand):
    help = "Revoke every API token of USER."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")

    def handle(self, *args: object, username: str, **options: object) -> None:
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no user {username!r}")
        count = actions.revoke_api_tokens(user, by=audit.cli_actor())
        self.stdout.write(f"revoked {count} token(s) of {username}")
