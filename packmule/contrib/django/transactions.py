"""``Runner.enqueue_on_commit`` on Django's transactions: the hook the app installs
into ``packmule._driver.on_commit`` at ready()."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.db import transaction

from packmule.contrib.django.signals import enqueue_failed

__all__ = ["defer"]

log = logging.getLogger("packmule")


def defer(runner: Any, method: str, send: Callable[[], object], using: str | None) -> None:
    """``send()`` once the transaction of ``using`` commits; at once (what it raises
    reaching the caller) when no transaction is open; never if it rolls back.
    After a commit, a failing ``send`` is logged with the run and the method and
    sent as ``enqueue_failed``: the caller is gone, the commit stands."""
    if transaction.get_autocommit(using):  # no transaction: as Django's on_commit, at once
        send()
        return

    def after_commit() -> None:
        try:
            send()
        except Exception as exc:
            log.exception("packmule: the on-commit enqueue of %s into run %r failed after the transaction "
                          "committed: the jobs were not queued", method, getattr(runner, "name", "?"))
            enqueue_failed.send(sender=type(runner), runner=runner, method=method, exception=exc)

    transaction.on_commit(after_commit, using=using)
