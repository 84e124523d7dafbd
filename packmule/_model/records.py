"""Value records, as every reader of a job's value sees them (signed pickles):
``('ok', value)``, ``('ref', job id)``, ``('err', failure info)``, ``('gone',)``
(consumed, not recorded), ``('void',)`` (its enqueue failed: it never ran and
never counts); ``records`` reads them, following references, and ``unwrap``
turns one into its value or its error.  The keys are ``packmule._model.keys``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from packmule._core.errors import JobFailed, NotReady, RunStateLost, ValuesNotRecorded
from packmule._model.keys import value_key
from packmule._transport.codec import Signer
from packmule._transport.spill import gather
from packmule.backends.base import Store

__all__ = ["GONE", "VOID", "records", "unwrap"]

GONE = ("gone",)
VOID = ("void",)  # the value of a job whose enqueue failed: it never counts, and a stray copy never runs


def records(
    store: Store, signer: Signer, ids: Sequence[str], trail: list[str] | None = None,
    missing: list[str] | None = None,
) -> dict[str, tuple[Any, ...]]:
    """Final value records of these job ids, following ``('ref', id)`` to the
    end; ids whose value does not exist yet are left out.  ``trail`` collects
    the ids passed through on the way (to mark them consumed); ``missing``, the
    value keys found absent where a chain ends (what a wait for them waits for)."""
    pending = {i: i for i in ids}  # asked id -> id whose record we need now
    out: dict[str, tuple[Any, ...]] = {}
    for _ in range(1000):
        if not pending:
            return out
        keys = {value_key(cur): asked for asked, cur in pending.items()}
        got = gather(store, signer, store.get_many(list(keys)))
        nxt = {}
        for key, asked in keys.items():
            raw = got.get(key)
            if raw is None:
                if missing is not None:
                    missing.append(key)
                continue
            rec = signer.loads(raw)
            if rec[0] == "ref":
                nxt[asked] = rec[1]
                if trail is not None:
                    trail.append(rec[1])
            else:
                out[asked] = rec
        pending = nxt
    raise RunStateLost("a chain of 1000 JobRefs: does a job return a reference to itself?")


def unwrap(record: Any, ref_id: str) -> Any:
    """The value in a final record, or the error it stands for."""
    kind = record[0]
    if kind == "ok":
        return record[1]
    if kind == "err":
        raise JobFailed(record[1])
    if kind == "gone":
        raise ValuesNotRecorded(
            f"the value of {ref_id} was not recorded: the runner has record_return_values=False "
            "(set it to True to read values with get_return_value)"
        )
    raise NotReady(f"{ref_id} has no value yet")
