"""The shop's runners: imported by the packmule app at ready(), in the test
process and in every worker process (no --import)."""

import json
import os
import select
import signal
import time
import warnings

from django.db import connections, transaction

import packmule
from tests.django_project.shop.models import Order

IMPORTED_IN = os.getpid()  # (a worker that ran a job had imported this module)


class Shop(packmule.Runner):
    record_return_values = True
    max_retries = 0  # a job that fails fails for good: the tests see each first attempt

    def write(self, alias, name, amount=1):
        Order.objects.using(alias).create(name=name, amount=amount, worker_pid=os.getpid())
        return os.getpid()

    def names(self, alias):
        return sorted(Order.objects.using(alias).values_list("name", flat=True))

    def session(self, alias):
        """(process id, the database session this job used): the session changes when the connection does."""
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()" if connections[alias].vendor == "postgresql" else "SELECT 1")
            session = cursor.fetchone()[0]
        raw = connections[alias].connection
        return os.getpid(), session if connections[alias].vendor == "postgresql" else id(raw)

    def leave_atomic_open(self, alias, name):
        transaction.atomic(using=alias).__enter__()  # never exited: the job leaves its transaction open
        Order.objects.using(alias).create(name=name, worker_pid=os.getpid())
        return os.getpid()

    def leave_autocommit_off(self, alias, name):
        transaction.set_autocommit(False, using=alias)  # never committed nor put back
        Order.objects.using(alias).create(name=name, worker_pid=os.getpid())
        return os.getpid()

    def break_connection(self, alias):
        connections[alias].ensure_connection()
        connections[alias].connection.close()  # behind Django's back: its wrapper still holds it
        return os.getpid()

    def imported_runners_module(self):
        import sys

        return "tests.django_project.shop.runners" in sys.modules and os.getpid() == IMPORTED_IN

    def meet(self, alias, name, wait=30.0):
        """Write a row, then wait until a job of another process has written one too (jobs that
        run at once in two worker processes); then {"pid", "session": pg_backend_pid(), "pooled"}."""
        Order.objects.using(alias).create(name=name, worker_pid=os.getpid())
        deadline = time.monotonic() + wait
        while not Order.objects.using(alias).exclude(worker_pid=os.getpid()).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no job of another worker process wrote a row within {wait} s")
            time.sleep(0.05)
        return {"pid": os.getpid(), "session": backend_pid(alias), "pooled": connections[alias].pool is not None}

    def fork_sessions(self, alias, hold):
        return fork_sessions(alias, hold)

    def write_each(self, name, alias):
        return self.write(alias, name)

    def out_of_stock(self, item):
        raise LookupError(f"out of stock: {item}")


def backend_pid(alias):
    """The PostgreSQL session (server process id) of this thread's connection to ``alias``."""
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def fork_sessions(alias, hold, wait=60.0):
    """What a fork child of a process that uses the pool of ``alias`` does with it.  The process
    takes both connections of its pool (max_size 2: all of its sessions are then known), returns
    them to the pool unless ``hold``, and forks; the child runs one query.  Returns {"pid",
    "parent": the parent's two sessions (Django's connection's first), "child": the child's
    session or its error, "status": the child's wait status, "alive": the parent's sessions
    (sorted) still open after the child ended, "after": the parent's session when it queries
    again}."""
    conn = connections[alias]
    if conn.pool is None:
        raise ValueError(f"database {alias!r} has no connection pool (OPTIONS['pool'])")
    first = backend_pid(alias)  # (the connection Django took from the pool)
    other = conn.pool.getconn()  # (the pool's other connection: the pool is then all checked out)
    try:
        with other.cursor() as cursor:
            second = cursor.execute("SELECT pg_backend_pid()").fetchone()[0]
        if not hold:
            conn.close()  # (back to the pool: both now wait there)
            conn.pool.putconn(other)
            other = None
        child, status = in_fork_child(lambda: backend_pid(alias), wait)
    finally:
        if other is not None:
            conn.pool.putconn(other)
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s) ORDER BY pid", [[first, second]])
            alive = [row[0] for row in cursor.fetchall()]
        after = backend_pid(alias)
    except Exception as exc:  # (the parent's session is gone: the child ended it)
        alive = after = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return {"pid": os.getpid(), "parent": [first, second], "child": child, "status": status,
            "alive": alive, "after": after}


def in_fork_child(fn, wait):
    """(fn()'s value or its error, the child's wait status): ``fn`` run in a child of ``os.fork``,
    its answer sent on a pipe; a child silent for ``wait`` s is killed."""
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (forking a process with threads: ours are quiet)
        pid = os.fork()
    if pid == 0:  # the child: answer, and out without running the parent's exit handlers
        code = 1
        try:
            os.close(read)
            try:
                answer = {"value": fn()}
            except Exception as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(write, json.dumps(answer).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], wait)
        data = os.read(read, 65536) if ready else b""
    finally:
        os.close(read)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    status = os.waitpid(pid, 0)[1]
    answer = json.loads(data) if data else {"error": f"no answer within {wait} s" if not ready else "no answer"}
    return answer.get("value", answer.get("error")), status
