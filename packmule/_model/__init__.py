"""The run model, shared by the driver and the worker: the keys a run's state
lives under (``keys``), which names may run as jobs (``methods``), value
records (``records``), a running job and a continuation's spec (``job``), a
run's tree read back for a recount or ``forget`` (``census``), and what the job
path writes for a dashboard (``registry``).  It imports the transport, the
backends' interface and ``packmule._core``, never the driver or the worker."""
