"""packmule's conformance suite, installed as ``packmule.conformance``.

The repository's own test run imports this folder as the top-level package
``conformance``, and so does pytest for an editable install of packmule (it
names a module by the folders above it that hold an ``__init__.py``).  Then
this package's helper modules (every module but ``conftest`` and the
``test_*`` ones) are the ``packmule.conformance`` modules under both names: one
harness registry, and one import path for each runner class a job pickles by
reference, however pytest got here.
"""

import importlib
import os
import sys


def _share_installed_modules() -> None:
    try:
        installed = importlib.import_module("packmule.conformance")
    except ImportError:  # packmule not installed: this folder's own modules, as they are
        return
    if sorted(map(os.path.realpath, installed.__path__)) != sorted(map(os.path.realpath, __path__)):
        return  # the installed suite is another copy: keep this folder's own modules
    for entry in sorted(os.listdir(__path__[0])):
        name, ext = os.path.splitext(entry)
        if ext == ".py" and name not in ("__init__", "conftest") and not name.startswith("test_"):
            module = importlib.import_module(f"packmule.conformance.{name}")
            sys.modules[f"{__name__}.{name}"] = module
            globals()[name] = module


if __name__ != "packmule.conformance":
    _share_installed_modules()
