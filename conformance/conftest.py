"""Runs every test of the suite once per backend named by ``--backends`` (or
``PACKMULE_CONFORMANCE_BACKENDS``; default ``local``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .harness import HARNESSES, Harness


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--backends", default=None,
                     help="comma-separated backends to run the conformance suite on (default: local)")


def backend_names(config: pytest.Config) -> list[str]:
    raw = config.getoption("--backends") or os.environ.get("PACKMULE_CONFORMANCE_BACKENDS") or "local"
    return [n.strip() for n in raw.split(",") if n.strip()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "harness" in metafunc.fixturenames:
        metafunc.parametrize("harness", backend_names(metafunc.config), indirect=True, scope="session")


@pytest.fixture(scope="session")
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    name = request.param
    if name not in HARNESSES:
        raise pytest.UsageError(f"no conformance harness for backend {name!r}; known: {sorted(HARNESSES)}")
    with HARNESSES[name]() as h:
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
