"""The ``--backends`` option of the conformance suite, for an installed packmule.

pytest reads a conftest's command-line options only from a conftest it finds
before it parses the command line, which it never does for ``--pyargs``.  So
packmule declares this module as a pytest plugin (the ``pytest11`` entry point
``packmule-conformance``): pytest loads it in every session, and it adds
``--backends`` when, and only when, ``--pyargs`` names the conformance suite::

    python -m pytest --pyargs packmule.conformance --backends NAME

Every other session is left as it is.  When pytest is given the suite's folder
instead, ``conftest.py`` adds the option itself.
"""

from __future__ import annotations

import pytest

OPTIONS_PLUGIN = "packmule-conformance-options"  # registered when this module added the options


def add_options(parser: pytest.Parser) -> None:
    parser.addoption("--backends", default=None,
                     help="comma-separated backends to run packmule's conformance suite on "
                          "(default: PACKMULE_CONFORMANCE_BACKENDS, else local)")


def names_the_suite(arg: str) -> bool:
    """Whether a ``--pyargs`` argument collects (part of) the conformance suite."""
    module = arg.split("::")[0]
    return module in ("packmule", "packmule.conformance") or module.startswith("packmule.conformance.")


class _Options:
    def pytest_addoption(self, parser: pytest.Parser) -> None:
        add_options(parser)


def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    ns = early_config.known_args_namespace
    manager = early_config.pluginmanager
    if ns.pyargs and any(names_the_suite(str(a)) for a in ns.file_or_dir) and not manager.has_plugin(OPTIONS_PLUGIN):
        manager.register(_Options(), OPTIONS_PLUGIN)
