from django.core.management.base import BaseCommand, CommandError

from elections import audit


class Command(BaseCommand):
    help = "Check the audit log's hash chain. Exit code 1 names the first broken link."

    def handle(self, *args: object, **options: object) -> None:
        verdict = audit.verify()
        if not verdict.ok:
            raise CommandError(
                f"audit chain broken after {verdict.checked - 1} intact entries: {verdict.message}",
                returncode=1,
            )
        self.stdout.write(f"audit chain ok: {verdict.message}")
