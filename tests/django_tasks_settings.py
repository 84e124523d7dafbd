"""Django settings for tests/test_django_tasks.py, read by the test process and
by the packmule workers it starts (``DJANGO_SETTINGS_MODULE``): ``TASKS``
aliases on packmule (default, one that retries, one with two queues) beside
Django's own ImmediateBackend to compare results with.  No database: nothing
here uses one."""

import importlib.util

DJANGO_TASKS = importlib.util.find_spec("django.tasks") is not None  # Django 6.0+: no backport
SOURCE = "django.tasks" if DJANGO_TASKS else "django_tasks"
BACKEND = "packmule.contrib.django.tasks.PackmuleBackend"

SECRET_KEY = "packmule-tests-only"
USE_TZ = True
INSTALLED_APPS = [] if DJANGO_TASKS else ["django_tasks"]
DATABASES: dict[str, dict[str, str]] = {}
TASKS = {
    "default": {"BACKEND": BACKEND},
    "retrying": {"BACKEND": BACKEND, "OPTIONS": {"max_retries": 2, "retry_delay": 0.01}},
    "queues": {"BACKEND": BACKEND, "QUEUES": ["default", "emails"]},
    "immediate": {"BACKEND": f"{SOURCE}.backends.immediate.ImmediateBackend"},
}
LOGGING = {"version": 1, "disable_existing_loggers": False,
           "loggers": {"django_tasks": {"level": "CRITICAL"}, "django.tasks": {"level": "CRITICAL"}}}
