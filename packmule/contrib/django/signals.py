"""Signals of the packmule Django app."""

from __future__ import annotations

from django.dispatch import Signal

__all__ = ["enqueue_failed"]

# Sent when an on-commit enqueue (Runner.enqueue_on_commit / enqueue_each_on_commit)
# fails after its transaction committed: the rows are there, the jobs are not.
# sender: the runner's class; keywords: runner, method, exception.
enqueue_failed = Signal()
