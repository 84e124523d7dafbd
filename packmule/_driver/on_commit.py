"""``Runner.enqueue_on_commit`` and ``enqueue_each_on_commit``: queue jobs when
the current database transaction commits.

The driver never imports a web framework: what "when the transaction commits"
means is a hook (``install``) that a framework's integration installs
(``packmule.contrib.django``, when its app is ready: Django's
``transaction.on_commit``).  Without one, the methods raise ``RuntimeError``
saying what to install.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

__all__ = ["Defer", "OnCommit", "install"]


class Defer(Protocol):
    """``defer(runner, send, using)``: call ``send()`` (the enqueue) once the
    transaction of the database ``using`` commits (at once outside one; never if
    it rolls back); what ``send`` raises after the commit is the hook's to report."""

    def __call__(self, runner: Any, method: str, send: Callable[[], object], using: str | None) -> None: ...


_defer: Defer | None = None


def install(defer: Defer | None) -> None:
    """Set (or, with None, remove) how an on-commit enqueue waits for the commit."""
    global _defer
    _defer = defer


def _hook() -> Defer:
    if _defer is None:
        raise RuntimeError("enqueue_on_commit needs a framework's transactions: add 'packmule.contrib.django' to "
                           "INSTALLED_APPS (pip install 'packmule[django]'); elsewhere, call enqueue after your "
                           "commit")
    return _defer


class OnCommit:
    """Runner's on-commit enqueues (a mixin of ``packmule.Runner``)."""

    if TYPE_CHECKING:  # (Runner's)
        def enqueue(self, method_name: str, *args: Any, **kwargs: Any) -> Any: ...
        def enqueue_each(self, method_name: str, items: Iterable[Any], *args: Any, **kwargs: Any) -> Any: ...
        def _check_method(self, method_name: str) -> None: ...

    def enqueue_on_commit(self, method_name: str, *args: Any, using: str | None = None, **kwargs: Any) -> None:
        """``enqueue(method_name, *args, **kwargs)`` once the current transaction
        of the database ``using`` (default: the default database) commits; at once
        outside a transaction; nothing if it rolls back.  Returns None: the JobRef
        does not exist yet."""
        defer = _hook()
        self._check_method(method_name)  # (a name that is no job method is refused now, not after the commit)
        defer(self, method_name, lambda: self.enqueue(method_name, *args, **kwargs), using)

    def enqueue_each_on_commit(self, method_name: str, items: Iterable[Any], *args: Any, using: str | None = None,
                               **kwargs: Any) -> None:
        """``enqueue_each(method_name, items, *args, **kwargs)`` once the current
        transaction commits (as ``enqueue_on_commit``); ``items`` is read now."""
        defer = _hook()
        self._check_method(method_name)
        items = list(items)
        defer(self, method_name, lambda: self.enqueue_each(method_name, items, *args, **kwargs), using)

