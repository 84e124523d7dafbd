"""Settings of the example shop (development only: DEBUG, a fixed key).

``SHOP_DB``: the SQLite file (default ``django_shop.sqlite3`` in the current
folder; a file, never memory, since the workers are processes of their own);
``SHOP_PG=host:port/name``: PostgreSQL instead (user ``SHOP_PG_USER``, default postgres).
Any ``PACKMULE_*`` variable overrides ``PACKMULE`` (``PACKMULE_BACKEND=beanstalk``
with ``manage.py packmule_worker`` beside it, for a cluster)."""

import os

SECRET_KEY = "django-shop-example-only"  # noqa: S105 (an example on 127.0.0.1)
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "packmule.examples.django_shop.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
STATIC_URL = "static/"
INSTALLED_APPS = [
    "django.contrib.admin", "django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions",
    "django.contrib.messages", "django.contrib.staticfiles",
    "packmule.contrib.django", "packmule.examples.django_shop",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware", "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware", "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request", "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages"]},
}]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.abspath(os.environ.get("SHOP_DB") or "django_shop.sqlite3"),
        # the workers write beside the server: WAL lets readers through, IMMEDIATE takes the write lock at
        # the start of a transaction (no deadlock between two upgrading readers), timeout waits for it
        "OPTIONS": {"timeout": 30, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"},
    },
}
PACKMULE = {"BACKEND": "local", "WORKERS": 4}
if os.environ.get("SHOP_PG"):
    _address, _, _name = os.environ["SHOP_PG"].partition("/")
    _host, _, _port = _address.partition(":")
    DATABASES["default"] = {"ENGINE": "django.db.backends.postgresql", "HOST": _host, "PORT": _port or "5432",
                            "NAME": _name or "django_shop", "USER": os.environ.get("SHOP_PG_USER", "postgres")}
