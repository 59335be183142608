from elections import actions, audit
from elections.management.users import UserCommand


class Command(UserCommand):
    help = "Revoke every API token of USER."

    def handle(self, *args: object, username: str, **options: object) -> None:
        count = actions.revoke_api_tokens(self.user(username), by=audit.cli_actor())
        self.stdout.write(f"revoked {count} token(s) of {username}")
