"""The packmule Django app (``INSTALLED_APPS += ["packmule.contrib.django"]``)."""

from __future__ import annotations

import logging
import os

from django.apps import AppConfig
from django.utils.module_loading import autodiscover_modules

from packmule._core.config import POOL_VAR

__all__ = ["PackMuleConfig"]

log = logging.getLogger("packmule")

_wired = False  # (the process-wide hooks, once per process)


class PackMuleConfig(AppConfig):
    name = "packmule.contrib.django"
    label = "packmule"
    verbose_name = "packmule"
    default = True

    def ready(self) -> None:
        """Export the ``PACKMULE`` setting (the environment wins), install the hooks,
        import each app's runners module: in web processes and workers alike."""
        from packmule.contrib.django import checks, conf

        setting = conf.packmule_setting()
        conf.export(setting)
        _wire()
        autodiscover_modules(conf.runners_module(setting))
        server = checks.multiprocess_server()  # (no system check runs under a WSGI server: said here too)
        if server is not None and POOL_VAR not in os.environ:  # (a worker process: its driver said it)
            for message in checks.check_local_backend():
                log.warning("packmule: %s (%s)", message.msg, message.hint)


def _wire() -> None:
    global _wired
    if _wired:
        return
    _wired = True
    from packmule._core.hooks import WORKER_ENV
    from packmule._driver import on_commit
    from packmule.contrib.django import transactions, worker

    on_commit.install(transactions.defer)
    WORKER_ENV.append(worker.env_for_workers)
    os.register_at_fork(after_in_child=worker.forget_inherited_connections)
