"""The text of a job's traceback, as a worker records it for ``JobFailed``.

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

DYNAMIC = "<dynamic-code>"


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
