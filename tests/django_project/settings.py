"""Settings of the test project.  ``DJANGO_TEST_PG_PORT``: the port of the
PostgreSQL the tests start (``pytest_fixtures.py``), of ``pg`` and ``pgpool``;
``DJANGO_TEST_PACKMULE``: a JSON ``PACKMULE`` setting (the checks' tests)."""

import json
import os
import tempfile

SECRET_KEY = "packmule-tests-only"
DEBUG = False
USE_TZ = True
ROOT_URLCONF = "tests.django_project.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = ["packmule.contrib.django", "tests.django_project.shop", "django.contrib.admin",
                  "django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions",
                  "django.contrib.messages"]
MIDDLEWARE = ["django.contrib.sessions.middleware.SessionMiddleware", "django.middleware.common.CommonMiddleware",
              "django.middleware.csrf.CsrfViewMiddleware", "django.contrib.auth.middleware.AuthenticationMiddleware",
              "django.contrib.messages.middleware.MessageMiddleware"]
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True,
              "OPTIONS": {"context_processors": ["django.template.context_processors.request",
                                                 "django.contrib.auth.context_processors.auth",
                                                 "django.contrib.messages.context_processors.messages"]}}]
BASE_DIR = os.path.dirname(os.path.abspath(__file__))

_SQLITE = os.path.join(tempfile.gettempdir(), f"packmule-django-{os.environ.get('DJANGO_TEST_DB_TAG', 'x')}")
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": _SQLITE + ".sqlite3",
        "TEST": {"NAME": _SQLITE + "-test.sqlite3"},  # a file: worker processes see it (in memory they could not)
        "OPTIONS": {"timeout": 30},
        "CONN_MAX_AGE": None,  # persistent: the worker's per-job connection handling is what keeps them sound
    },
    "pg": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": "127.0.0.1",
        "PORT": os.environ.get("DJANGO_TEST_PG_PORT", "5432"),
        "USER": "postgres",
        "NAME": "packmule",
        "CONN_MAX_AGE": None,
    },
}
# The same PostgreSQL database through a connection pool (Django 5.1+, psycopg_pool): a test mirror of
# "pg" (its test database, flushed with it; no third test database to create), CONN_MAX_AGE 0 (Django
# refuses a pool with persistent connections).  max_size 2: tests/test_django_pool.py knows every
# connection of a process's pool by holding both.
DATABASES["pgpool"] = {**DATABASES["pg"], "CONN_MAX_AGE": 0, "OPTIONS": {"pool": {"min_size": 1, "max_size": 2}},
                       "TEST": {"MIRROR": "pg"}}
PACKMULE = json.loads(os.environ.get("DJANGO_TEST_PACKMULE", "{}"))
LOGGING_CONFIG = None
