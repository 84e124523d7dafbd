"""Configuration: every environment variable packmule reads, read here, only when
a backend is built (never at import time).  Which backend a process uses
(``PACKMULE_BACKEND``, the entry point group, one per name and settings) is
``packmule.backends._choice``'s, which reads this table's first line.

=====================  ==========================================================
PACKMULE_BACKEND       ``local`` (default) or ``beanstalk``, or any name registered
                       under the ``packmule.backends`` entry point group
PACKMULE_WORKERS       local: worker processes to start (default: CPU count)
PACKMULE_BEANSTALKD    beanstalk: ``host:port,host:port`` (default 127.0.0.1:11300)
PACKMULE_MEMCACHED     beanstalk: ``host:port,...`` (default 127.0.0.1:11211)
PACKMULE_ZOOKEEPER     beanstalk: ``host:port,...`` (default 127.0.0.1:2181)
PACKMULE_TUBE          beanstalk: the tube jobs go to (default ``packmule``)
PACKMULE_SECRET        beanstalk: the HMAC key every process shares
PACKMULE_INSECURE      beanstalk: ``1`` to run without a secret on private servers
PACKMULE_STATE_TTL     seconds a run's state is kept in the store (default 7 days)
PACKMULE_MAX_PAYLOAD   bytes: the largest pickled argument list, runner or return value
                       packmule carries, on every backend alike (default 32 MiB)
PACKMULE_DELAY_SCALE   a factor on the delays packmule picks itself: retry backoff, a
                       continuation's re-check of its inputs, a wait's poll interval
                       (default 1; ``packmule.testing`` sets 0.001 so tests never wait)
PACKMULE_DASHBOARD_TOKEN  the token every request to the dashboard (``packmule.web``) must
                       carry; required to serve it on an address other than loopback
PACKMULE_DASHBOARD_PORT   a driver process serves the dashboard on this loopback port from
                       its first run on (the local backend's runs are visible only there)
=====================  ==========================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["DEFAULT_MAX_PAYLOAD", "DEFAULT_STATE_TTL", "DELAY_SCALE_VAR", "POOL_VAR", "dashboard_port",
           "dashboard_token", "delay_scale", "max_payload", "spill_above", "split_servers", "state_ttl"]

DEFAULT_STATE_TTL = 7 * 24 * 3600.0  # memcached caps relative expiry at 30 days
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024  # bytes: fits a default memcached (64 MB) with room to spare
DELAY_SCALE_VAR = "PACKMULE_DELAY_SCALE"
POOL_VAR = "PACKMULE_WORKER_POOL"  # (not the user's: a spawner tells its worker processes how many its pool has)

def state_ttl(env: Mapping[str, str] | None = None) -> float:
    env = os.environ if env is None else env
    raw = env.get("PACKMULE_STATE_TTL", "")
    try:
        return float(raw) if raw else DEFAULT_STATE_TTL
    except ValueError:
        raise ValueError(f"PACKMULE_STATE_TTL={raw!r} is not a number of seconds") from None


def max_payload(env: Mapping[str, str] | None = None) -> int:
    """The largest payload (pickled arguments of one job, a runner, a return
    value) packmule carries: the same on every backend, so code that works on
    one works on all.  Larger ones are refused at the call (or fail the job)."""
    env = os.environ if env is None else env
    raw = env.get("PACKMULE_MAX_PAYLOAD", "")
    if not raw:
        return DEFAULT_MAX_PAYLOAD
    if not raw.isdigit() or int(raw) < 1024:
        raise ValueError(f"PACKMULE_MAX_PAYLOAD={raw!r}: give a whole number of bytes >= 1024")
    return int(raw)


def spill_above(env: Mapping[str, str] | None = None) -> int | None:
    """``PACKMULE_SPILL_ABOVE``: a payload (queue body, stored value) over this many
    bytes goes to the store in chunks even where the backend could hold it whole
    (a memcached started with a small ``-I``; the conformance suite sets it so the
    chunked path runs on every backend).  None: only over the backend's own limits."""
    raw = (os.environ if env is None else env).get("PACKMULE_SPILL_ABOVE", "")
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1024:
        raise ValueError(f"PACKMULE_SPILL_ABOVE={raw!r}: give a whole number of bytes >= 1024")
    return int(raw)


def delay_scale(env: Mapping[str, str] | None = None) -> float:
    """``PACKMULE_DELAY_SCALE``: the factor on retry backoff and poll delays (1
    unless set; ``packmule.testing`` sets it for its workers and the test)."""
    env = os.environ if env is None else env
    raw = env.get(DELAY_SCALE_VAR, "")
    try:
        scale = float(raw) if raw else 1.0
    except ValueError:
        scale = -1.0
    if not 0 <= scale <= 1:
        raise ValueError(f"{DELAY_SCALE_VAR}={raw!r}: give a factor from 0 to 1 (1: delays as documented)")
    return scale


def split_servers(value: str, variable: str) -> list[tuple[str, int]]:
    """``'h1:p1,h2:p2'`` -> ``[('h1', p1), ('h2', p2)]``, or a ValueError naming the variable."""
    servers = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{variable}={value!r}: {part!r} is not host:port")
        servers.append((host, int(port)))
    if not servers:
        raise ValueError(f"{variable} is empty; give host:port[,host:port...]")
    return servers


def dashboard_token(env: Mapping[str, str] | None = None) -> str | None:
    """``PACKMULE_DASHBOARD_TOKEN``, or None when unset or empty."""
    env = os.environ if env is None else env
    return env.get("PACKMULE_DASHBOARD_TOKEN") or None


def dashboard_port(env: Mapping[str, str] | None = None) -> int | None:
    """``PACKMULE_DASHBOARD_PORT``: the port a driver serves the dashboard on, or None when unset."""
    env = os.environ if env is None else env
    raw = env.get("PACKMULE_DASHBOARD_PORT", "")
    if not raw:
        return None
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"PACKMULE_DASHBOARD_PORT={raw!r}: give a TCP port number from 1 to 65535")
    return int(raw)
