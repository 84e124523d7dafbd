"""The worker layer: what a worker process does.  ``engine`` runs a batch of
reserved jobs, ``commit`` commits their effects, ``recovery`` makes sure of what
an earlier execution may have left undone, ``watchdog`` enforces time_to_run,
``serve`` is the loop every worker process runs, ``supervisor`` is
``packmule worker``, and ``local_process`` the process the local backend starts.
It never imports ``packmule._driver``: it builds runners from their pickles."""
