"""Repository-wide test settings: a clean PACKMULE_* environment, and, when
PACKMULE_REQUIRE_CLUSTER=1 (CI), a run that skipped any test fails."""

from __future__ import annotations

import os

import pytest

KEEP = {"PACKMULE_CONFORMANCE_BACKENDS", "PACKMULE_REQUIRE_CLUSTER"}

# The Django tests run in a session of their own, with the test project's settings (scripts/test):
#   DJANGO_SETTINGS_MODULE=tests.django_project.settings python -m pytest tests/test_django_*.py
# pytest-django sets Django up for a whole session, and its app's hooks (worker setup, connection
# handling) would then reach every other test's workers.
DJANGO_TESTS = "tests.django_project.settings"
DJANGO_SESSION = os.environ.get("DJANGO_SETTINGS_MODULE") == DJANGO_TESTS
collect_ignore_glob = [] if DJANGO_SESSION else ["tests/test_django_*.py"]
pytest_plugins = ["tests.django_project.pytest_fixtures"] if DJANGO_SESSION else []  # (its fixtures)


def pytest_configure(config: pytest.Config) -> None:
    for var in [v for v in os.environ if v.startswith("PACKMULE_") and v not in KEEP]:
        del os.environ[var]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("PACKMULE_REQUIRE_CLUSTER") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped and session.exitstatus == 0:
        if reporter:
            reporter.write_line(f"FAILED: {skipped} tests were skipped, and PACKMULE_REQUIRE_CLUSTER=1 "
                                "forbids skips (install beanstalkd, memcached and zookeeper)", red=True)
        session.exitstatus = 1
