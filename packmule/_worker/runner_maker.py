"""A fresh runner object per job, made from the one stored runner (``RunnerMaker``).

The worker never imports ``packmule.Runner``: whether a runner class keeps the
pickling of packmule's own runner classes is asked of
``packmule._model.methods.FRAMEWORK``, the set those classes add themselves to."""

from __future__ import annotations

__all__ = ["RunnerMaker", "immutable"]

import pickle
from typing import Any

import cloudpickle

from packmule._core.types import JobRef
from packmule._model.methods import FRAMEWORK
from packmule.backends.base import Backend

# Exact types whose values no job can change in place.  JobRef is a tuple of
# two str with no attributes of its own.
IMMUTABLE = frozenset({type(None), bool, int, float, complex, str, bytes, JobRef})


def immutable(value: Any) -> bool:
    kind = type(value)
    if kind in IMMUTABLE:
        return True
    if kind is tuple or kind is frozenset:
        return all(immutable(v) for v in value)
    return False


class RunnerMaker:
    """Makes a fresh runner object per job from one stored runner, so jobs never
    share mutable state.

    A runner whose attributes are all immutable (the usual case: a name, flags,
    numbers, strings) is copied shallowly from a prototype: a shallow copy of
    such an object is as fresh as an unpickled one, and ten times cheaper.  Any
    other runner, or one whose class customizes ``__getstate__``/``__setstate__``,
    is unpickled from its state for every job."""

    __slots__ = ("cls", "backend", "attrs", "state")

    def __init__(self, proto: Any, backend: Backend) -> None:
        cls: Any = type(proto)
        self.cls, self.backend = cls, backend
        state = proto.__getstate__()
        self.attrs: dict[str, Any] | None = None
        self.state = b""
        # (packmule's own runner classes, packmule.Runner: their pickling keeps only plain attributes)
        own_pickling = any(cls.__getstate__ is getattr(base, "__getstate__", None)  # (3.10: object has none)
                           and cls.__setstate__ is getattr(base, "__setstate__", None) for base in FRAMEWORK)
        if own_pickling and all(immutable(v) for v in state.values()):
            self.attrs = self._build(state).__dict__
        else:
            self.state = cloudpickle.dumps(state, 5)

    def _build(self, state: Any) -> Any:
        obj = self.cls.__new__(self.cls)
        obj.__setstate__(state)
        obj.__dict__["_pm_backend"] = self.backend
        return obj

    def __call__(self) -> Any:
        if self.attrs is None:
            return self._build(pickle.loads(self.state))
        obj = self.cls.__new__(self.cls)
        obj.__dict__ = self.attrs.copy()
        return obj
