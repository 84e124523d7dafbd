"""``manage.py packmule_dashboard``: ``packmule dashboard`` with the project's settings."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from packmule.contrib.django.management.commands._cli import run_cli


class Command(BaseCommand):
    help = "Serve packmule's web dashboard (packmule dashboard; needs packmule[web])."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="address to bind (any other than loopback needs "
                                                                "a token)")
        parser.add_argument("--port", type=int, default=8765, help="TCP port (default 8765)")
        parser.add_argument("--token", default=None, help="the token every request must carry "
                                                          "(default: PACKMULE_DASHBOARD_TOKEN)")

    def handle(self, *args: Any, **options: Any) -> None:
        run_cli("dashboard", "--host", options["host"], "--port", str(options["port"]),
                *(["--token", options["token"]] if options["token"] else []))
