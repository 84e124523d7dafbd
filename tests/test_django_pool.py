"""Django's connection pools (5.1+, PostgreSQL ``OPTIONS["pool"]``, psycopg_pool) in
packmule's processes, on the local backend and on a beanstalk cluster served by
``manage.py packmule_worker``: jobs use the pooled alias (``pgpool``: the same test
database as ``pg``, through a pool of at most 2 connections a process), each
worker process has a pool and sessions of its own, and a fork child of a process
that used its pool makes its own pool without touching its parent's."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.db import connections

from tests.django_project.shop.models import Order
from tests.django_project.shop.runners import Shop, backend_pid, fork_sessions

# (pg: flushed for its mirror pgpool; default: pg's test database is made after it, TEST["DEPENDENCIES"])
pytestmark = [pytest.mark.django_db(transaction=True, databases=["default", "pg", "pgpool"]),
              pytest.mark.packmule(workers=2)]
WORKER_PROCESSES = 2  # (the beanstalk cluster's: manage.py packmule_worker --concurrency 2)
POOLED = "pgpool"
POOL_SIZE = settings.DATABASES[POOLED]["OPTIONS"]["pool"]["max_size"]
WAIT = 60.0


@pytest.fixture(scope="module", autouse=True)
def driver_pool_closed() -> Iterator[None]:
    """This process's pool holds sessions on pg's test database, which pytest-django
    drops at the end of the session: DROP DATABASE refuses while sessions are open."""
    yield
    connections[POOLED].close()
    connections[POOLED].close_pool()


def names(alias: str) -> list[str]:
    return sorted(Order.objects.using(alias).values_list("name", flat=True))


def test_the_pooled_alias_has_a_pool_on_the_test_database() -> None:
    conn = connections[POOLED]
    assert conn.pool is not None, f"{POOLED!r} has no connection pool: OPTIONS {conn.settings_dict['OPTIONS']}"
    assert conn.settings_dict["NAME"] == connections["pg"].settings_dict["NAME"], "pgpool is not pg's test mirror"
    assert backend_pid(POOLED) != backend_pid("pg")  # (a session of its own, from its pool)


def test_jobs_on_the_pooled_database_write_rows_that_the_driver_reads(mule: Any) -> None:
    Order.objects.using(POOLED).create(name="from-the-driver")
    shop = Shop("pooled-writes")
    refs = [shop.enqueue("write", POOLED, f"order-{i}", i) for i in range(4)]
    mule.join(WAIT)
    read = shop.enqueue("names", POOLED)
    mule.join(WAIT)
    pids = {shop.get_return_value(ref) for ref in refs}
    assert os.getpid() not in pids, "a job ran in the test's own process, not in a worker"
    expected = ["from-the-driver", "order-0", "order-1", "order-2", "order-3"]
    assert names(POOLED) == expected, "the driver, through its pool, does not read the jobs' rows"
    assert names("pg") == expected, "the driver, without a pool, does not read the jobs' rows"
    assert shop.get_return_value(read) == expected, "a job, through its pool, does not read the rows"
    assert set(Order.objects.using(POOLED).exclude(worker_pid=None).values_list("worker_pid", flat=True)) == pids


def test_each_worker_process_has_a_pool_and_sessions_of_its_own(mule: Any) -> None:
    driver = backend_pid(POOLED)  # (this process holds its pooled connection while the jobs run)
    shop = Shop("pooled-sessions")
    refs = [shop.enqueue("meet", POOLED, f"meet-{i}") for i in range(8)]  # (the first two meet: two processes)
    mule.join(WAIT)
    seen = [shop.get_return_value(ref) for ref in refs]
    assert all(s["pooled"] for s in seen), f"a job's connection came from no pool: {seen}"
    by_worker: dict[int, set[int]] = defaultdict(set)
    by_session: dict[int, set[int]] = defaultdict(set)
    for s in seen:
        by_worker[s["pid"]].add(s["session"])
        by_session[s["session"]].add(s["pid"])
    assert len(by_worker) >= 2 and os.getpid() not in by_worker, f"the jobs' processes: {sorted(by_worker)}"
    assert driver not in by_session, f"a job used the test process's session {driver}: {dict(by_session)}"
    shared = {session: sorted(pids) for session, pids in by_session.items() if len(pids) > 1}
    assert not shared, f"sessions used by two worker processes (a shared pool): {shared}"
    # 8 jobs in 2 processes, at most POOL_SIZE sessions each: the processes reuse their pools' connections
    # (with CONN_MAX_AGE 0 and no pool, each job would open a session of its own)
    too_many = {pid: sorted(sessions) for pid, sessions in by_worker.items() if len(sessions) > POOL_SIZE}
    assert not too_many, f"worker processes used more sessions than their pool holds ({POOL_SIZE}): {too_many}"
    assert backend_pid(POOLED) == driver  # (the test process's connection is still its own, and works)


def check_fork(got: dict[str, Any], hold: bool) -> None:
    """What ``fork_sessions`` saw: the child used a session of its own, and the parent's
    sessions outlived the child and still serve the parent."""
    parent = got["parent"]
    assert len(set(parent)) == POOL_SIZE, f"the parent's pool had not {POOL_SIZE} distinct sessions: {got}"
    assert os.WIFEXITED(got["status"]) and os.WEXITSTATUS(got["status"]) == 0, f"the fork child failed: {got}"
    assert isinstance(got["child"], int), f"the fork child's query failed: {got['child']}"
    assert got["child"] not in parent, f"the fork child used a session of its parent's pool: {got}"
    assert got["alive"] == sorted(parent), f"the parent's sessions did not outlive the fork child: {got}"
    if hold:
        assert got["after"] == parent[0], f"the parent did not keep the connection it held: {got}"
    else:
        assert got["after"] in parent, f"the parent's pool did not serve it one of its sessions: {got}"


@pytest.mark.parametrize("hold", [True, False], ids=["connections-held", "connections-in-the-pool"])
def test_a_fork_child_of_the_test_process_makes_a_pool_of_its_own(hold: bool) -> None:
    got = fork_sessions(POOLED, hold)
    check_fork(got, hold)
    assert got["pid"] == os.getpid()
    assert backend_pid(POOLED) in got["parent"]  # (the parent's pool still serves it)


@pytest.mark.parametrize("hold", [True, False], ids=["connections-held", "connections-in-the-pool"])
def test_a_fork_child_of_a_job_makes_a_pool_of_its_own(mule: Any, hold: bool) -> None:
    shop = Shop("pooled-fork")
    first = shop.enqueue("fork_sessions", POOLED, hold)
    mule.join(WAIT)
    got = shop.get_return_value(first)
    check_fork(got, hold)
    assert got["pid"] != os.getpid(), "the job ran in the test's own process"
