"""The shop's runners: imported by the packmule app at ready(), in the test
process and in every worker process (no --import)."""

import os

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

    def write_each(self, name, alias):
        return self.write(alias, name)

    def out_of_stock(self, item):
        raise LookupError(f"out of stock: {item}")
