from django.core.management.base import BaseCommand

from elections.tasks import sweep


class Command(BaseCommand):
    help = "Run the periodic work once (stale agents, election statuses) without a broker."

    def handle(self, *args: object, **options: object) -> None:
        self.stdout.write(str(sweep()))
