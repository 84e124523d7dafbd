"""packmule in a Django project: ``INSTALLED_APPS += ["packmule.contrib.django"]``.

- ``apps``: at ready(), the ``PACKMULE`` setting goes to the environment (the
  environment wins), each installed app's ``runners`` module is imported, and
  the hooks below are installed.
- ``conf``: the ``PACKMULE`` setting read and checked.
- ``worker``: what every worker process does first (``django.setup()`` with the
  driver's database names) and around each job (``close_old_connections()``).
- ``transactions``, ``signals``: ``Runner.enqueue_on_commit`` and its failures.
- ``checks``: ``manage.py check``'s packmule messages.
- ``tasks``: ``PackmuleBackend``, a ``django.tasks`` backend that runs tasks on
  packmule's workers.
- ``admin``: the runs in Django's admin (``/admin/packmule/``), staff only.
- ``views``: ``progress_urls(allow=...)``, what ``<packmule-progress>`` reads, as plain views.
- ``asgi``: ``with_dashboard(django_app, "/packmule", allow=...)``, the ASGI dashboard
  beside the project, ``request.user`` being the Django user.
- ``management/commands``: ``packmule_worker``, ``packmule_status``,
  ``packmule_progress``, ``packmule_dashboard``.

README, "Django", tells the whole story.
"""
