"""A Django shop whose page starts a packmule run on commit and shows its live bar.

    python -m packmule.examples.django_shop setup        # a file SQLite (./django_shop.sqlite3), 100 products
    python -m packmule.examples.django_shop runserver    # http://127.0.0.1:8000/

This package is the project (``settings``, ``urls``, ``__main__`` as its
``manage.py``) and its one app (label ``django_shop``): ``Product`` rows, a
``Summary`` row per run, and ``runners.Reprice``.  The Reprice button POSTs
``/reprice``, whose transaction records the request and queues the run on commit
(``enqueue_on_commit``): its root job fans out over the 100 products
(``enqueue_each``) and returns a ``deferred_result`` continuation that writes the
run's summary row, once - 101 jobs in all.  ``/runs/<name>/`` shows the run's
``<packmule-progress>`` bar, which reads ``/progress/api/runs/<name>`` (plain
Django views from ``packmule.contrib.django.views``); ``/admin/packmule/`` lists
every run for staff.  The local backend's workers are started by the server's
process at the first run; ``SHOP_DB`` names another database file.
"""
