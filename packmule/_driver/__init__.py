"""The driver layer: what a program that queues and follows runs does.
``runner`` (``packmule.Runner``: enqueue, deferred_result, progress, cancel,
forget), the blocking waits, the run's state as the driver reads it, the
registry as a dashboard reads it (``watcher``), and the dashboard a driver
serves when asked (through a hook: the driver never imports ``packmule.web``).
It never imports ``packmule._worker``."""
