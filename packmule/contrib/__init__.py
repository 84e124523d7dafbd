"""Integrations of packmule with frameworks (``packmule.contrib.django``): faces on
top of packmule's layers, reaching the core through its hooks
(``packmule._core.hooks``, ``packmule._model.job.HOOKS``,
``packmule._driver.on_commit``), which never import them."""
