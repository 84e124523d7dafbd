"""What a commit does for a job that another execution of it committed first.

A job runs again when its worker died, its time_to_run passed or the queue
server restarted, and the first execution may have stopped anywhere in its
commit (``packmule._worker.engine``: values, counts, then queue puts).  The adds keep
the counts from doubling; two effects of the first execution must be made
sure of by the next one, because a dead worker leaves no sign of them:

- *the count of its children in ``total``.*  A job that loses the add of its
  commit marker (``cm:``) puts its children again, in case the first execution
  died before it did.  It must not put a child that ``total`` does not count:
  the child would be done before it is counted (``done > total``, and a run
  that never completes).  The winner of the marker writes ``"<n> counted"``
  into it right after its count; a marker without that (its winner died
  between the add and the count, or after the count, or is still in between)
  has the run recounted from its records first (``packmule._model.census``, under
  the run's recount lock, after the settle delay that lets a live winner
  count), and is then marked.
- *the continuations its completion made ready.*  The worker whose count
  completes a continuation's inputs queues it; if that worker died, or its put
  failed, before the put, nothing else would (the item delivered again finds
  its value taken and only acks it).  So a job that lost the add of its value,
  or came back after its commit, queues again each continuation it notifies
  whose arrived count is complete and that has not run (no value, no commit
  marker).  A second copy is harmless: its value's add makes it count once.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence

from packmule._core.errors import BackendUnavailable
from packmule._model import census as _census
from packmule._model.keys import job_id
from packmule._transport.codec import Signer
from packmule._transport.wire import Task
from packmule._worker.outcomes import Outcome
from packmule.backends.base import Backend

__all__ = ["ensure_counted", "mark", "ready_again"]

log = logging.getLogger("packmule")


def mark(positions: int) -> bytes:
    """A commit marker that says its job's children are counted in ``total``."""
    return b"%d" % positions + _census.COUNTED


def ensure_counted(backend: Backend, signer: Signer, ttl: float, unsure: Sequence[Outcome]) -> set[int]:
    """Make sure ``total`` counts the children of these jobs, which lost the add
    of their commit marker, before they are put again.  Returns the ids of the
    outcomes that could not be made sure of now (the run's recount lock was
    held too long, or the recount failed): their children must wait."""
    store = backend.store
    by_key = {o.p + "cm:" + o.task.path: o for o in unsure}
    got = store.get_many(list(by_key))
    runs: dict[str, list[str]] = defaultdict(list)  # run prefix -> its markers not marked counted
    for key, o in by_key.items():
        marker = got.get(key)
        if marker is not None and not _census.counted(marker):  # (gone: the run's state is; nothing to count)
            runs[o.p].append(key)
    held: set[int] = set()
    for p, keys in runs.items():
        t = by_key[keys[0]].task
        try:
            with _census.lock_run(backend, t.name):
                fixed = _census.recount(backend, signer, t.name, t.gen, p, ttl)
        except BackendUnavailable:
            raise  # (the batch goes back to the queue unacked: nothing uncounted was queued)
        except Exception as exc:  # the lock was held too long, or the recount failed: the jobs come back later
            log.warning("run %r: %d job(s) whose enqueues another execution committed wait: no recount now (%r)",
                        t.name, len(keys), exc)
            held.update(id(by_key[key]) for key in keys)
            continue
        log.warning("run %r: job %s ran again, and the execution that committed its enqueues first did not say "
                    "it counted them; recounted before queueing its children: %s", t.name,
                    job_id(t.name, t.gen, t.path), fixed or "nothing to fix")
        store.set_many({key: mark(_census.positions(got[key])) for key in keys}, ttl)
    return held


def ready_again(backend: Backend, again: Sequence[Outcome],
                continuation: Callable[[Task, str], Task]) -> list[Task]:
    """The continuations notified by these jobs (completed by another execution,
    delivered again after their commit, or split out of a bundle whose worker
    died) whose inputs have all arrived and that have not run: to queue again."""
    wanted: dict[tuple[str, str], tuple[int, Task]] = {}  # (run prefix, path) -> (inputs expected, its task)
    for o in again:
        watchers = o.spec.watchers if o.spec is not None else o.task.watchers
        for path, expected in watchers:
            wanted.setdefault((o.p, path), (expected, continuation(o.task, path)))
    if not wanted:
        return []
    got = backend.store.get_many([p + kind + path for p, path in wanted for kind in ("n:", "v:", "cm:")])
    ready = []
    for (p, path), (expected, task) in wanted.items():
        arrived = got.get(p + "n:" + path)
        if arrived is not None and int(arrived) >= expected and p + "v:" + path not in got \
                and p + "cm:" + path not in got:
            ready.append(task)
    if ready:
        log.info("queued again %d continuation(s) whose inputs all arrived but that never ran (their "
                 "notifier died or failed before it queued them), e.g. %s", len(ready),
                 job_id(ready[0].name, ready[0].gen, ready[0].path))
    return ready
