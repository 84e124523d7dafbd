"""Runners and exceptions a hostile (or careless) user writes, for
``test_isolation.py``.  Importable, so that workers of any backend load them."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import packmule

from .runners import WAIT_LIMIT, note


class Boom:
    """Unpickling this runs code (it opens a file for writing): exactly what a forged body would try."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


class Unshowable(Exception):
    """Its str() and repr() raise."""

    def __str__(self) -> str:
        raise RuntimeError("no str for you")

    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


class Unpicklable(Exception):
    """It holds a lock: pickle refuses it."""

    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


class Ununpicklable(Exception):
    """Pickles, but unpickling calls __init__ with one argument of two."""

    def __init__(self, a: Any, b: Any) -> None:
        super().__init__(a)
        self.b = b


class StrIsNotStr(Exception):
    def __str__(self) -> Any:
        return 42


class Meta(type):
    """A metaclass that lies about (and fails on) the class's name."""

    @property
    def __name__(cls) -> str:  # type: ignore[override]
        raise RuntimeError("no name")


class Nameless(Exception, metaclass=Meta):
    pass


def cyclic() -> BaseException:
    a, b = ValueError("a"), KeyError("b")
    a.__cause__, b.__cause__ = b, a
    a.__context__, b.__context__ = b, a
    return a


def raising(kind: str) -> BaseException:
    """The exception of each kind ``Hostile.bad`` raises."""
    if kind == "unshowable":
        return Unshowable()
    if kind == "unpicklable":
        return Unpicklable()
    if kind == "ununpicklable":
        return Ununpicklable("first", "second")
    if kind == "str_not_str":
        return StrIsNotStr()
    if kind == "nameless":
        return Nameless("x")
    if kind == "huge":
        return ValueError("x" * (100 << 20))  # a 100 MB message
    if kind == "cycle":
        return cyclic()
    if kind == "bad_notes":
        exc = ValueError("noted")
        exc.__notes__ = 5  # type: ignore[attr-defined]
        return exc
    if kind == "system_exit":
        return SystemExit(3)
    if kind == "keyboard_interrupt":
        return KeyboardInterrupt()
    if kind == "generator_exit":
        return GeneratorExit()
    raise AssertionError(kind)


KINDS = ("unshowable", "unpicklable", "ununpicklable", "str_not_str", "nameless", "huge", "cycle", "bad_notes",
         "system_exit", "keyboard_interrupt", "generator_exit")
TYPE_NAMES = {"unshowable": "Unshowable", "unpicklable": "Unpicklable", "ununpicklable": "Ununpicklable",
              "str_not_str": "StrIsNotStr", "nameless": "Nameless", "huge": "ValueError", "cycle": "ValueError",
              "bad_notes": "ValueError", "system_exit": "SystemExit", "keyboard_interrupt": "KeyboardInterrupt",
              "generator_exit": "GeneratorExit"}


class NoReduce:
    """A return value whose pickling raises SystemExit."""

    def __reduce__(self) -> Any:
        raise SystemExit("not from a value")


class Hostile(packmule.Runner):
    wait_timeout = WAIT_LIMIT
    record_return_values = True
    max_retries = 0
    retry_delay = 0.05

    def ok(self, x: Any) -> Any:
        return x

    def bad(self, kind: str, path: str) -> None:
        note(path, "ran")
        raise raising(kind)

    def returns_unpicklable_by_exit(self) -> Any:
        return NoReduce()

    def returns_ununpicklable(self) -> Any:
        return Ununpicklable("first", "second")  # pickles; unpickling it raises TypeError

    def returns_forged_ref(self) -> Any:
        return packmule.JobRef.fast("a/0a1b2c3d/0/extra", "nowhere:1")  # a JobRef packmule never made

    def defer_on_forged_ref(self) -> Any:
        return self.deferred_result("ok", [packmule.JobRef.fast("a/0a1b2c3d/0/extra", "nowhere:1")])

    def fan_over(self, method: str) -> Any:
        return self.deferred_result("ok", [self.enqueue(method)])

    def fan_over_ununpicklable(self) -> Any:
        return self.deferred_result("ok", [self.enqueue("returns_ununpicklable")])

    def _private(self, x: Any) -> Any:  # a single-underscore job method: allowed
        return ("private", x)

    @property
    def prop(self) -> int:
        return 1

    label = "a class attribute, not a method"

    def forget(self, path: str | None = None) -> None:  # type: ignore[override]  # a name packmule.Runner owns
        if path:
            note(path, "forget ran as a job")
        else:
            super().forget()

    def __call__(self, path: str) -> None:  # a dunder of the user's own
        note(path, "__call__ ran as a job")


class Gate(packmule.Runner):
    """Jobs that wait (up to WAIT_LIMIT) for a file to exist, so that a run stays
    in progress while a test does something else."""

    wait_timeout = WAIT_LIMIT
    record_return_values = True

    def held(self, i: int, gate: str) -> int:
        deadline = time.monotonic() + WAIT_LIMIT
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        return i * i

    def one(self, x: Any = None) -> Any:
        return x
