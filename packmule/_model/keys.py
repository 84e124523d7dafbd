"""Every key packmule writes to a store, and every name it builds one from,
named in this one module (ARCHITECTURE.md, "Why effects count exactly once").

The rule that keeps runs apart: a user-chosen name is only ever one *segment*
of a key, and segments are joined with ``/``, which no name may contain
(``check_name``: letters, digits and ``_ - . :``).  So a key can be split back
into its segments in exactly one way, and no choice of run name addresses a
key of another run, a registry key or a global key.  Everything after a run's
name is written by packmule itself: a generation is 8 hex digits, a path is
dotted decimals, a field is one of ``RUN_FIELDS`` or ``PATH_FIELDS``.

A generation's keys carry it as their store *tag* (``{<gen>}``, see
``backends.base.Store``): they all live on one server, the one the tag names
in every process, whichever servers are up (``RunState`` picks a generation
whose server is up when it makes one).

Keys (``P`` = ``pm/<name>/{<gen>}/``)::

    pm/<name>            the run's current generation (``forget`` deletes it); in the
                         backend's ``registers`` instead when it has them
    P total|done|failed  counters (created with the generation; missing = lost)
    P seq                counter that numbers jobs queued from outside any job
    P root               path of the first job queued from outside any job
    P cancel             present once the run is cancelled
    P t                  when the generation started (the registry's list of runs)
    P next               the generation that replaced this one once it completed
    P wake               drivers blocked on the run: "<channel> <done count>" per line (``_model.wake``)
    P gap:<path>         paths from <path> on, this many, that an outside enqueue left unused
    P v:<path>           the job's value record; its add is the job's completion
    P cm:<path>          the job's enqueues were committed (its add counts total once): the
                         positions it used; "<n> counted" once total counts its children
    P n:<path>           a continuation's arrived-inputs counter
    P spec:<path>        a continuation's method, inputs and links
    P try:<path>         failed attempts of a job
    P q:<block>          a job of the shard whose first path is <block> went to a queue server
                         not its preferred one (``_model.placement``)
    P f:<k>              path of the k-th failed job (for ``packmule status``)
    P blob:<digest>      a pickled runner, stored once per state and generation
    pm-body:{<gen>}:<digest>:<i>  chunks of a queue body too large for the queue (``_spill``)
    pm-rejected:<keyid>  "<time> <worker key id>": workers refused jobs signed by that secret
    pm-reg:* pm-stats:*  what a dashboard reads (``_model.registry``)
    pm-djtask:{<id>}     a Django task result's record (``packmule.contrib.django.tasks``; its run is
                         ``django-task-<id>``)

A value too large for one store item is kept in chunks under its own key
followed by ``#<digest>:<i>`` (``_spill``); ``#`` is in no field.

Locks get the same treatment: a user's ``Runner.lock(name)`` is ``user/<name>``,
packmule's own are ``pm/...``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "BLOB_FIELD", "GLOBAL_PREFIXES", "PATH_FIELDS", "QUEUED_FIELD", "RUN_FIELDS", "blob_key", "check_gen",
    "check_name", "job_id", "parse_job_id", "pointer", "prefix", "recount_lock", "rejected_key", "user_lock",
    "value_key", "value_keys",
]

SEP = "/"  # joins a key's segments; check_name keeps it out of every name
NAME_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,200}\Z")
GEN_RE = re.compile(r"[0-9a-f]{8}\Z")
PATH_RE = re.compile(r"[0-9]{1,18}(?:\.[0-9]{1,9}){0,200}\Z")

# A run generation's fields, each named once: forget() deletes what these name,
# and the conformance suite tries a colliding run name against every one of them.
RUN_FIELDS = ("total", "done", "failed", "seq", "root", "cancel", "t", "next", "wake", "held")
COUNTERS = ("done", "total", "failed")  # (the order progress_of reads them in)
PATH_FIELDS = ("v:", "cm:", "n:", "spec:", "try:", "gap:")  # + a job's path
FAILED_FIELD = "f:"  # + the failure's number, 1, 2, ...
QUEUED_FIELD = "q:"  # + the block of a shard key (``_transport.wire.shard``): its jobs may be on any queue server
BLOB_FIELD = "blob:"  # + a runner's digest
GLOBAL_PREFIXES = ("pm-body:", "pm-rejected:", "pm-reg:", "pm-stats:")


def check_name(name: str, what: str = "run name") -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    if not NAME_RE.match(name):
        raise ValueError(
            f"{what} {name!r} is not allowed: use 1 to 200 characters of letters, digits and _ - . :"
        )
    return name


def check_gen(gen: str) -> str:
    """A generation as packmule makes them (``new_gen``); anything else is refused."""
    if not isinstance(gen, str) or not GEN_RE.match(gen):
        raise ValueError(f"generation {gen!r} is not one packmule makes (8 lowercase hex digits)")
    return gen


def pointer(name: str) -> str:
    return f"pm{SEP}{name}"


def prefix(name: str, gen: str) -> str:
    return f"pm{SEP}{name}{SEP}{{{gen}}}{SEP}"


def blob_key(p: str, digest: str) -> str:
    """The runner blob's key in the run generation whose prefix is ``p``."""
    return f"{p}{BLOB_FIELD}{digest}"


def rejected_key(key_id: str) -> str:
    """Where workers note that they refused jobs signed by the secret with this key id."""
    return f"pm-rejected:{key_id}"


def user_lock(name: str) -> str:
    return f"user{SEP}{check_name(name, 'lock name')}"


def recount_lock(name: str) -> str:
    return f"pm{SEP}{name}{SEP}recount"


def job_id(name: str, gen: str, path: str) -> str:
    return f"{name}/{gen}/{path}"


def parse_job_id(ref_id: str) -> tuple[str, str, str]:
    """``(name, gen, path)`` of a job id; ``ValueError`` for one packmule never made."""
    parts = ref_id.split("/") if isinstance(ref_id, str) else []
    if (len(parts) != 3 or not NAME_RE.match(parts[0]) or not GEN_RE.match(parts[1])
            or not PATH_RE.match(parts[2])):
        raise ValueError(f"{ref_id!r} is not a job id packmule made ('<run name>/<generation>/<path>'); "
                         "pass the JobRef that enqueue returned")
    return parts[0], parts[1], parts[2]


def value_key(ref_id: str) -> str:
    name, gen, path = parse_job_id(ref_id)
    return f"{prefix(name, gen)}v:{path}"


def value_keys(ref_ids: Sequence[str]) -> list[str]:
    """``value_key`` of each id; each run's part of the key is checked and built once."""
    heads: dict[str, str] = {}  # 'name/gen' -> 'pm/name/gen/v:'
    out = []
    for ref_id in ref_ids:
        head, _, path = ref_id.rpartition("/")
        key_head = heads.get(head)
        if key_head is None:
            name, gen, _ = parse_job_id(ref_id)
            key_head = heads[head] = prefix(name, gen) + "v:"
        elif not PATH_RE.match(path):
            parse_job_id(ref_id)  # (raises, naming it)
        out.append(key_head + path)
    return out
