"""Repository-wide test settings: a clean PACKMULE_* environment, and, when
PACKMULE_REQUIRE_CLUSTER=1 (CI), a run that skipped any test fails."""

from __future__ import annotations

import os

import pytest

KEEP = {"PACKMULE_CONFORMANCE_BACKENDS", "PACKMULE_REQUIRE_CLUSTER"}


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
