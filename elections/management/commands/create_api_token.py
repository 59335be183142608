from django.core.management.base import CommandError

from elections import actions, audit
from elections.management.users import UserCommand


class Command(UserCommand):
    help = "Issue an API bearer token acting as USER. The token is printed once and stored hashed."

    def handle(self, *args: object, username: str, **options: object) -> None:
        user = self.user(username)
        if not user.is_active:
            raise CommandError(f"user {username!r} is inactive")
        self.stdout.write(actions.issue_api_token(user, by=audit.cli_actor()))
