"""A tiny Django project for packmule's Django tests (tests/test_django_*.py): the
app ``shop`` (a model and its runners), on a file SQLite database (``default``)
and on PostgreSQL (``pg``, started by the tests on a free loopback port)."""
