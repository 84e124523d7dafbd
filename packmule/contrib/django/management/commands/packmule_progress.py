"""``manage.py packmule_progress NAME [--watch]``: ``packmule progress`` with the project's settings."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from packmule.contrib.django.management.commands._cli import run_cli


class Command(BaseCommand):
    help = "A run's progress (packmule progress); a live bar until it completes with --watch."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--watch", action="store_true", help="draw a live progress bar until the run completes")

    def handle(self, *args: Any, **options: Any) -> None:
        run_cli("progress", options["name"], *(["--watch"] if options["watch"] else []))
