"""Which names of a runner may run as jobs: checked by ``enqueue`` (and
``deferred_result``) at the call, and again by the worker before it calls one,
since a body names its method by a string.

A job method is a callable attribute defined by the user's runner class or one
of its bases, other than packmule's own classes and ``object``:

- dunder names (``__init__``, ``__reduce_ex__``, ...) are Python's machinery: refused;
- any name that ``packmule.Runner`` defines (``enqueue``, ``wait``, ``_options``, ...)
  is refused, even where a subclass overrides it, and so is every ``_pm_`` name;
- single-underscore methods of the user's class *are* job methods: Pack Mule's
  ``enqueue`` reached private methods through Ruby's ``send``, and a helper
  method kept out of a class's public API is still the author's own code.
  A name reaches ``enqueue`` from the program itself, never from a job's data.
"""

from __future__ import annotations

__all__ = ["FRAMEWORK", "refusal"]

FRAMEWORK: set[type] = set()  # packmule's own runner classes (Runner and its mixins add themselves)


def refusal(cls: type, name: object) -> str | None:
    """Why ``name`` is not a job method of ``cls``, or None if it is one."""
    if not isinstance(name, str):
        return f"a method name must be a str, not {type(name).__name__}"
    if name.startswith("__") and name.endswith("__"):
        return (f"{name!r} is a dunder name (Python's machinery, not a job method); "
                "a job method is one your runner class defines")
    if name.startswith("_pm_") or any(name in vars(base) for base in FRAMEWORK):
        return f"{name!r} is packmule.Runner's own, not a job method; give your method another name"
    owner = next((klass for klass in cls.__mro__ if name in vars(klass)), None)
    if owner is None or owner is object:
        return f"{cls.__name__} has no method {name!r} to run as a job"
    if not callable(getattr(cls, name, None)):
        kind = type(vars(owner)[name]).__name__
        return f"{cls.__name__}.{name} is not a method (it is a {kind}), so it cannot run as a job"
    return None
