from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from elections import audit


class Command(BaseCommand):
    help = (
        "Check the audit log's hash chain (exit code 1 names the first broken link), and that "
        "heads published earlier are still in it: deleting the newest entries leaves an "
        "intact chain, which only a head kept elsewhere can expose."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--head", action="append", default=[], help="a head hash kept elsewhere (repeatable)"
        )
        parser.add_argument(
            "--heads-file", type=Path, help="a file of published heads (ELECTORATE_AUDIT_HEAD_FILE)"
        )

    def handle(
        self, *args: object, head: list[str], heads_file: Path | None, **options: object
    ) -> None:
        verdict = audit.verify()
        if not verdict.ok:
            raise CommandError(
                f"audit chain broken after {verdict.checked - 1} intact entries: {verdict.message}",
                returncode=1,
            )
        self.stdout.write(f"audit chain ok: {verdict.message}")
        heads: list[tuple[int | None, str]] = [(None, h) for h in head]
        if heads_file is not None:
            try:
                heads += audit.read_heads(heads_file)
            except (OSError, ValueError, KeyError) as exc:
                raise CommandError(f"{heads_file}: cannot read published heads: {exc}") from None
        if heads:
            found = audit.verify_heads(heads)
            if not found.ok:
                raise CommandError(f"audit log truncated: {found.message}", returncode=1)
            self.stdout.write(f"heads ok: {found.message}")
