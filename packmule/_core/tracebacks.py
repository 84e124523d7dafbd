"""What a worker records of an exception a job raised, for ``JobFailed``:
its type, message and traceback text, made so that no exception can stop
the job from ending.

Job code may raise anything: an exception whose ``str`` and ``repr`` raise,
one with a 100 MB message, a chain of causes with a cycle, ``SystemExit``.
``describe`` never raises (every step that runs the exception's own code is
guarded, and says what could not be shown) and keeps each text within
``MESSAGE_MAX``/``TRACEBACK_MAX`` characters, so the record always fits the
store.

cloudpickle names the file of code it pickled by value ``<dynamic-code>`` (a
runner defined in ``__main__``, or in a test module while ``packmule.testing``
runs the test), which would leave the traceback without file or source lines.
The frame's globals still say which file the module came from (cloudpickle
keeps ``__file__``): where that file is on this machine, its name and lines are
shown.
"""

from __future__ import annotations

import traceback
from types import TracebackType
from typing import Any, NamedTuple

__all__ = ["DYNAMIC", "MESSAGE_MAX", "TRACEBACK_MAX", "Described", "cut", "describe", "short_repr", "traceback_text"]

DYNAMIC = "<dynamic-code>"
MESSAGE_MAX = 10_000  # characters of an exception's message a failure record keeps
TRACEBACK_MAX = 100_000  # characters of its traceback text


class Described(NamedTuple):
    exc_type: str
    message: str
    traceback: str


def describe(exc: BaseException) -> Described:
    """The type name, message and traceback text of ``exc``, each bounded; never raises."""
    name = _name(exc)
    try:
        message = str(exc)
        if not isinstance(message, str):
            raise TypeError(f"__str__ returned {type(message).__name__}")
    except BaseException as err:  # its own code: anything may come out
        message = f"<the exception's message cannot be shown: str() raised {_name(err)}>"
    try:
        text = traceback_text(exc)
    except BaseException as err:
        text = f"<the traceback of {name} cannot be shown: formatting it raised {_name(err)}>"
    return Described(name, cut(message, MESSAGE_MAX), cut(text, TRACEBACK_MAX))


def cut(text: str, limit: int) -> str:
    """``text`` within ``limit`` characters: its head and tail, saying how much was left out."""
    if len(text) <= limit:
        return text
    keep = (limit - 60) // 2
    return f"{text[:keep]}\n... [{len(text) - 2 * keep:,} characters left out] ...\n{text[-keep:]}"


def short_repr(obj: Any, limit: int = 500) -> str:
    """``repr(obj)`` within ``limit`` characters; a repr that raises must not hide the real failure."""
    try:
        text = repr(obj)
        if not isinstance(text, str):
            raise TypeError(f"__repr__ returned {type(text).__name__}")
    except BaseException as exc:
        text = f"<unrepresentable: repr() raised {_name(exc)}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _name(exc: BaseException) -> str:
    """The name of ``exc``'s class, as ``type`` itself knows it (a metaclass cannot override it)."""
    return str(_TYPE_NAME.__get__(type(exc)))


_TYPE_NAME = vars(type)["__name__"]


def traceback_text(exc: BaseException) -> str:
    """``traceback.format_exception(exc)``, with the files of by-value code put back."""
    summary = traceback.TracebackException.from_exception(exc)
    te: traceback.TracebackException | None = summary
    seen: set[int] = set()
    cur: BaseException | None = exc
    while te is not None and cur is not None and id(cur) not in seen:  # the exception, then its causes
        seen.add(id(cur))
        _put_back_files(te.stack, cur.__traceback__)
        if te.__cause__ is not None:
            te, cur = te.__cause__, cur.__cause__
        else:
            te, cur = te.__context__, cur.__context__
    return "".join(summary.format())


def _put_back_files(stack: traceback.StackSummary, tb: TracebackType | None) -> None:
    frames = [frame for frame, _ in traceback.walk_tb(tb)]
    if len(frames) != len(stack):
        return
    for summary, frame in zip(stack, frames, strict=True):
        if summary.filename == DYNAMIC:
            origin = frame.f_globals.get("__file__")
            if isinstance(origin, str):
                summary.filename = origin
                summary._line = None  # type: ignore[attr-defined]  # (read from that file when shown)
