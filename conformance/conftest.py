"""Runs every test of the suite once per backend named by ``--backends`` (or
``PACKMULE_CONFORMANCE_BACKENDS``; default ``local``), each served by the
harness :func:`harness.factory_for` finds for it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .harness import Factory, Harness, factory_for, spill_limit
from .plugin import OPTIONS_PLUGIN, add_options

FACTORIES = pytest.StashKey[dict[str, Factory]]()


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    if not pluginmanager.has_plugin(OPTIONS_PLUGIN):  # else plugin.py added them (a --pyargs run)
        add_options(parser)


def backend_names(config: pytest.Config) -> list[str]:
    raw = config.getoption("--backends") or os.environ.get("PACKMULE_CONFORMANCE_BACKENDS") or "local"
    return [n.strip() for n in raw.split(",") if n.strip()]


def pytest_collection_modifyitems(config: pytest.Config) -> None:
    """Find every backend's harness before any test runs: a name without one stops the run, saying why."""
    try:
        config.stash[FACTORIES] = {name: factory_for(name) for name in backend_names(config)}
    except LookupError as exc:
        pytest.exit(f"packmule conformance suite: {exc}", returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "harness" in metafunc.fixturenames:
        metafunc.parametrize("harness", backend_names(metafunc.config), indirect=True, scope="session")


@pytest.fixture(scope="session")
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    with spill_limit(), request.config.stash[FACTORIES][request.param]() as h:
        yield h


@pytest.fixture
def backend(harness: Harness):  # type: ignore[no-untyped-def]
    return harness.backend


@pytest.fixture
def bare(harness: Harness) -> Iterator[Harness]:
    """A backend of the harness's kind that no worker serves, and the ``env``
    another process needs to reach it (``Harness.bare``)."""
    if harness.bare is None:
        pytest.fail(f"the harness of backend {harness.backend.name!r} gives no `bare` backend: the backend-level "
                    "contract tests need one that no worker serves (see Harness.bare in conformance/harness.py)")
    with harness.bare() as h:
        yield h
