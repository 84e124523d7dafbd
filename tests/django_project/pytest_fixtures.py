"""Fixtures of the Django tests (imported by tests/test_django_*.py): a PostgreSQL
of the session's own, and the packmule backends the tests run on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from conformance.harness import Harness, beanstalk_harness, stop_worker
from conformance.postgres import PostgreSQL, postgres_installed

ROOT = Path(__file__).resolve().parent.parent.parent
MANAGE = str(ROOT / "tests" / "django_project" / "manage.py")
SETTINGS = "tests.django_project.settings"
WAIT = 60.0


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgreSQL]:
    missing = postgres_installed()
    if missing:
        pytest.skip(missing)
    with PostgreSQL() as server:
        yield server


@pytest.fixture(scope="session")
def django_db_modify_db_settings(postgres: PostgreSQL) -> None:
    """(pytest-django's hook before it makes the test databases.)  The ``pg`` and
    ``pgpool`` aliases on the session's PostgreSQL; worker processes read the port
    from the environment."""
    os.environ["DJANGO_TEST_PG_PORT"] = str(postgres.port)
    for alias in ("pg", "pgpool"):
        settings.DATABASES[alias]["PORT"] = str(postgres.port)


def django_env(**extra: str) -> dict[str, str]:
    """The environment of a process of the test project (a worker, manage.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACKMULE_")}
    env.update(DJANGO_SETTINGS_MODULE=SETTINGS, PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def manage(*args: str, env: dict[str, str] | None = None, timeout: float = WAIT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, MANAGE, *args], cwd=ROOT, env=env or django_env(), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module", params=["local", "beanstalk"])
def cluster(request: pytest.FixtureRequest, django_db_setup: None) -> Iterator[Harness | None]:
    """None: each test's own local backend (the packmule_backend fixture); or a real
    beanstalk cluster served by ``manage.py packmule_worker --concurrency N``, started
    once the test databases exist and told their names (PACKMULE_DJANGO_DATABASES).
    N: the test module's ``WORKER_PROCESSES``, else 1."""
    if request.param == "local":
        yield None
        return
    processes = int(getattr(request.module, "WORKER_PROCESSES", 1))
    with beanstalk_harness(concurrency=0) as h:
        names = {alias: str(db["NAME"]) for alias, db in settings.DATABASES.items()}
        env = django_env(**h.env, PACKMULE_DJANGO_DATABASES=json.dumps(names))
        worker = subprocess.Popen([sys.executable, MANAGE, "packmule_worker", "--concurrency", str(processes),
                                   "--grace", "10", "--log-level", "WARNING"], cwd=ROOT, env=env,
                                  stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + WAIT
            while h.backend.queue.stats().workers < processes:
                assert worker.poll() is None, f"manage.py packmule_worker exited with {worker.returncode}"
                assert time.monotonic() < deadline, "manage.py packmule_worker did not start serving"
                time.sleep(0.1)
            h.extras["django_worker"] = worker
            yield h
        finally:
            stop_worker(worker)


@pytest.fixture
def mule(cluster: Harness | None, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The packmule_backend fixture on the module's backend: its own local backend, or,
    with PACKMULE_BACKEND=beanstalk set, the cluster's (it steps aside)."""
    if cluster is not None:
        for var, value in cluster.env.items():
            monkeypatch.setenv(var, value)
    return request.getfixturevalue("packmule_backend")


@pytest.fixture(params=["default", "pg"])
def alias(request: pytest.FixtureRequest) -> str:
    """The database a test runs on: ``default`` (a file SQLite) or ``pg`` (PostgreSQL)."""
    return str(request.param)
