"""packmule's Django app with real worker processes, on a file SQLite and on
PostgreSQL, on the local backend and on a beanstalk cluster served by
``manage.py packmule_worker``: jobs use the ORM on the test databases, on-commit
enqueues follow the transaction, and one job's connection trouble never reaches
the next job of its process."""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from typing import Any

import pytest
from django.db import connections, transaction

import packmule
from packmule.contrib.django.signals import enqueue_failed
from tests.django_project.shop.models import Order
from tests.django_project.shop.runners import Shop

pytestmark = [pytest.mark.django_db(transaction=True, databases=["default", "pg"]), pytest.mark.packmule(workers=1)]
WAIT = 60.0


class Probe(packmule.Runner):
    """(Defined in the test module: travels by value.)"""

    record_return_values = True
    max_retries = 0

    def state(self, alias: str) -> tuple[bool, bool, str]:
        import sys

        from django.apps import apps
        from django.conf import settings

        return ("tests.django_project.shop.runners" in sys.modules, apps.ready,
                str(settings.DATABASES[alias]["NAME"]))


def names(alias: str) -> list[str]:
    return sorted(Order.objects.using(alias).values_list("name", flat=True))


def test_workers_are_set_up_with_the_test_settings_and_the_apps_runners(mule: Any, alias: str) -> None:
    probe = Probe("probe")
    ref = probe.enqueue("state", alias)
    mule.join(WAIT)
    # the app imported the shop's runners module at ready(), in the worker (no --import),
    # and the worker's database is the test database this process uses
    assert tuple(probe.get_return_value(ref)) == (True, True, str(connections[alias].settings_dict["NAME"]))


def test_workers_write_rows_that_the_driver_then_reads(mule: Any, alias: str) -> None:
    shop = Shop("writes")
    refs = [shop.enqueue("write", alias, f"order-{i}", i) for i in range(3)]
    mule.join(WAIT)
    assert names(alias) == ["order-0", "order-1", "order-2"]
    pids = {shop.get_return_value(ref) for ref in refs}
    assert os.getpid() not in pids
    assert set(Order.objects.using(alias).values_list("worker_pid", flat=True)) == pids


def test_jobs_read_the_rows_the_driver_wrote(mule: Any, alias: str) -> None:
    Order.objects.using(alias).create(name="from-the-driver")
    shop = Shop("reads")
    ref = shop.enqueue("names", alias)
    mule.join(WAIT)
    assert shop.get_return_value(ref) == ["from-the-driver"]


def test_a_rollback_queues_nothing(mule: Any, alias: str) -> None:
    shop = Shop("rolled-back")
    with pytest.raises(RuntimeError, match="no sale"), transaction.atomic(using=alias):
        Order.objects.using(alias).create(name="never")
        assert shop.enqueue_on_commit("write", alias, "job", using=alias) is None
        raise RuntimeError("no sale")
    mule.join(WAIT)
    assert mule.runs == []
    assert names(alias) == []


def test_an_on_commit_enqueue_runs_after_the_commit(mule: Any, alias: str) -> None:
    shop = Shop("committed")
    with transaction.atomic(using=alias):
        Order.objects.using(alias).create(name="driver")
        shop.enqueue_on_commit("write", alias, "job", using=alias)
        shop.enqueue_each_on_commit("write_each", ["each-1", "each-2"], alias, using=alias)
        assert mule.runs == []  # nothing queued before the commit
    assert mule.runs == ["committed"]
    mule.join(WAIT)
    assert names(alias) == ["driver", "each-1", "each-2", "job"]


def test_an_on_commit_enqueue_outside_a_transaction_queues_at_once(mule: Any, alias: str) -> None:
    shop = Shop("at-once")
    assert shop.enqueue_on_commit("write", alias, "now") is None
    assert mule.runs == ["at-once"]
    mule.join(WAIT)
    assert names(alias) == ["now"]


def test_an_enqueue_that_fails_after_the_commit_is_logged_and_signalled(
        mule: Any, alias: str, caplog: pytest.LogCaptureFixture) -> None:
    got: list[dict[str, Any]] = []

    def receiver(sender: type, **kwargs: Any) -> None:
        got.append(dict(kwargs, sender=sender))

    enqueue_failed.connect(receiver)
    shop = Shop("unlucky")
    try:
        with caplog.at_level(logging.ERROR, logger="packmule"), transaction.atomic(using=alias):
            Order.objects.using(alias).create(name="kept")
            shop.enqueue_on_commit("write", alias, threading.Lock(), using=alias)  # cannot be pickled
    finally:
        enqueue_failed.disconnect(receiver)
    assert names(alias) == ["kept"]  # the commit stands
    assert [(g["sender"], g["runner"], g["method"]) for g in got] == [(Shop, shop, "write")]
    assert isinstance(got[0]["exception"], (TypeError, ValueError))
    assert "write" in caplog.text and "'unlucky'" in caplog.text


def test_a_job_method_name_is_refused_at_the_call_not_after_the_commit(mule: Any, alias: str) -> None:
    with pytest.raises(ValueError), transaction.atomic(using=alias):
        Shop("refused").enqueue_on_commit("wait", using=alias)


@pytest.mark.parametrize("leave", ["leave_atomic_open", "leave_autocommit_off", "break_connection"])
def test_a_job_that_leaves_its_connection_in_trouble_does_not_poison_the_next(mule: Any, alias: str,
                                                                             leave: str) -> None:
    shop = Shop("trouble")
    first = shop.enqueue(leave, alias, "ghost") if leave != "break_connection" else shop.enqueue(leave, alias)
    mule.join(WAIT)
    second = shop.enqueue("write", alias, "next")
    mule.join(WAIT)  # (raises if the second job failed)
    assert shop.get_return_value(first) == shop.get_return_value(second)  # the same worker process ran both
    assert names(alias) == ["next"]  # what the first job left uncommitted was rolled back


def test_a_worker_survives_a_database_restart_between_jobs(mule: Any, postgres: Any) -> None:
    shop = Shop("restart")
    first = shop.enqueue("session", "pg")
    mule.join(WAIT)
    postgres.restart()  # the worker's persistent connection (CONN_MAX_AGE=None) is now dead
    connections["pg"].close()  # (the test's own too)
    second = shop.enqueue("session", "pg")
    mule.join(WAIT)  # (raises if the job met the dead connection: max_retries = 0)
    (pid1, session1), (pid2, session2) = shop.get_return_value(first), shop.get_return_value(second)
    assert pid1 == pid2 and session1 != session2


def test_a_fork_child_makes_connections_of_its_own_and_leaves_its_parents_alone() -> None:
    def session() -> int:
        with connections["pg"].cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            return int(cursor.fetchone()[0])

    parent = session()
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (forking a process with threads: ours are quiet)
        pid = os.fork()
    if pid == 0:  # the child: its own session, and out without running the parent's exit handlers
        code = 1
        try:
            os.write(write, str(session()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    child = int(os.read(read, 64) or 0)
    os.close(read)
    assert os.waitpid(pid, 0)[1] == 0
    assert child and child != parent
    assert session() == parent  # the parent's connection was neither used nor closed by the child


@pytest.mark.django_db(databases=["default", "pg"])  # (not transactional: the test's transaction never commits)
def test_in_a_test_transaction_on_commit_enqueues_run_when_the_callbacks_are_captured(
        mule: Any, django_capture_on_commit_callbacks: Any) -> None:
    shop = Shop("captured")
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        shop.enqueue_on_commit("names", "default")
        assert mule.runs == []
    assert len(callbacks) == 1 and mule.runs == ["captured"]
    mule.join(WAIT)


@pytest.mark.parametrize("leave", ["leave_atomic_open", "leave_autocommit_off"])
def test_a_transaction_a_job_left_open_is_rolled_back_when_the_job_ends_not_at_the_next(
        mule: Any, leave: str) -> None:
    # Given a job that leaves its PostgreSQL transaction open (holding its locks), and no job after it
    Shop("left-open").enqueue(leave, "pg", "ghost")
    mule.join(WAIT)
    # Then, without waiting for another job, no session of the test database stays idle in a transaction
    deadline = time.monotonic() + 5.0
    while (stuck := idle_in_transaction()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if stuck:  # (ended here, or the test database's flush would wait behind their locks for ever)
        idle_in_transaction(terminate=True)
    assert stuck == 0
    assert names("pg") == []


def idle_in_transaction(terminate: bool = False) -> int:
    """How many other sessions of the test database are idle in a transaction (ending them)."""
    with connections["pg"].cursor() as cursor:
        cursor.execute(f"SELECT {'pg_terminate_backend(pid)' if terminate else 'pid'} FROM pg_stat_activity "
                       "WHERE datname = current_database() AND state LIKE 'idle in transaction%%' "
                       "AND pid <> pg_backend_pid()")
        return len(cursor.fetchall())
