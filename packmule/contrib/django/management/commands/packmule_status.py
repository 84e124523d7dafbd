"""``manage.py packmule_status [NAME]``: ``packmule status`` with the project's settings."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from packmule.contrib.django.management.commands._cli import run_cli


class Command(BaseCommand):
    help = "A run's progress, failures and queue; each server's state (packmule status)."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", nargs="?", help="the run (none: only the queue and the servers)")

    def handle(self, *args: Any, **options: Any) -> None:
        run_cli("status", *([options["name"]] if options["name"] else []))
