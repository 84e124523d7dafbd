"""Settings that fail to import (tests of a worker started with them)."""

raise RuntimeError("these settings are broken on purpose")
