"""The bottom layer: what every other layer uses and that imports nothing of
packmule's: the types users hold (``types``), the errors (``errors``), the
environment variables (``config``), a job's exception as text (``tracebacks``)
and what a fork child must not inherit (``fork``).  Private: users import these
names from ``packmule``."""
