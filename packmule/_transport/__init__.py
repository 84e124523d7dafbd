"""The transport layer: how jobs and values travel through a backend's queue
and store: signed pickles (``codec``), bundles of jobs (``wire``) and payloads
too large for one item, in chunks (``spill``).  It imports only
``packmule.backends.base`` and ``packmule._core``."""
