"""What a process made by ``os.fork`` must not inherit from its parent.

A child of ``os.fork`` (multiprocessing's ``fork`` start method, a pre-forking
server such as gunicorn ``--preload``) starts with copies of its parent's
objects, and of the descriptors of their sockets, but with none of its threads.
Two processes that talk on one socket read each other's answers; so every
object that holds a connection, a thread or a lock another thread may hold
registers here, and in each child, before the child runs anything else, its
``_forget_inherited()`` drops what is the parent's: it may close the child's own
copy of a descriptor (that sends nothing; the parent's connection stays as it
was) but never sends anything on it, nor shuts it down.  The child then makes
connections of its own at first use.  (``os.register_at_fork`` hooks run on every
fork that returns to Python; a fork that skips them, by C code, is not covered.)
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol

__all__ = ["ForkAware", "forget_at_fork"]


class ForkAware(Protocol):
    def _forget_inherited(self) -> None: ...


_fork_aware: weakref.WeakSet[ForkAware] = weakref.WeakSet()


def forget_at_fork(obj: ForkAware) -> None:
    """Call ``obj._forget_inherited()`` in every child that ``os.fork`` makes,
    before the child runs anything else (while ``obj`` lives)."""
    _fork_aware.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_fork_aware):
        obj._forget_inherited()


os.register_at_fork(after_in_child=_after_fork_in_child)
