"""How a blocking ``deferred_result`` reads its values (``ValueReader``), paced by
its ``Waiter`` (``waiting.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from packmule._driver.run_state import RunState
from packmule._transport.spill import gather

if TYPE_CHECKING:
    from packmule._driver.waiting import Waiter

__all__ = ["READ_CHUNK", "ValueReader"]

READ_CHUNK = 1000  # values a blocking deferred_result reads at a time, once that many jobs are done


class ValueReader:
    """How a blocking deferred_result reads its values.  They are read a window of
    READ_CHUNK keys at a time, from the first one missing on.  While windows come
    back full, the reader is behind the workers: it asks for the next window
    before it checks the values of this one, so that the store fetches while it
    checks.  With a counter to gate on (inputs of this run), values are read only
    when enough jobs finished since the last look: three counters are cheaper
    than a thousand values.  The run's ``done`` count is read with each window
    (after its values), and the next window is asked for ahead only when the
    jobs counted done since could fill it: a value is read once, not again and
    again while its job runs."""

    def __init__(self, state: RunState, keys: list[str], gen: str | None, waiter: Waiter) -> None:
        self.state, self.keys, self.gen, self.waiter = state, keys, gen, waiter
        self.recs: dict[str, tuple[Any, ...]] = {}
        self.refs_to_follow: dict[str, str] = {}  # value key -> the job id its value refers to
        self.pos = self.cursor = 0  # keys[:pos] are read; this sweep asked for keys[pos:cursor]
        self.seen_done = self.last_done = -1
        self.ahead: tuple[list[str], Callable[[], dict[str, bytes]]] | None = None  # a window asked for
        # the run's done counter, read with each window of values (after them): no extra trip to check it
        self.counters = [] if gen is None else state.counter_keys(gen)[:1]
        self.done: int | None = None

    def finished(self) -> bool:
        return self.pos >= len(self.keys)

    def step(self) -> None:
        keys, waiter, state = self.keys, self.waiter, self.state
        left = len(keys) - self.pos
        if self.ahead is None:
            if self.gen is not None and left > 100:
                now = state.progress(self.gen)
                assert now is not None
                if now.done != self.last_done:
                    # jobs are finishing: keep looking often, so that the values are
                    # read while workers run and the last ones soon after they exist
                    self.last_done = now.done
                    waiter.progressed()
                if now.done - self.seen_done < min(left, READ_CHUNK) and not now.complete:
                    waiter.pause(f"{left} of {len(keys)} jobs not done",
                                 until_done=min(self.seen_done + min(left, READ_CHUNK), now.total))
                    return
                self.seen_done = now.done
            self.cursor = self.pos
            self._ask()
        assert self.ahead is not None
        window, answer = self.ahead
        raw = answer()
        self.done = int(raw.pop(self.counters[0])) if self.counters and self.counters[0] in raw else None
        got = gather(state.store, state.signer, raw)
        self.ahead = None
        full = len(got) == len(window)  # every value asked for was there: more may be, ask for them now
        if full and self._worth_asking():  # (or, if too few jobs were done since, look again at once, gated)
            self._ask()
        for key, rec in zip(got, state.signer.loads_many(got.values()), strict=True):
            self.recs[key] = rec
            if rec[0] == "ref":
                self.refs_to_follow[key] = rec[1]
        while self.pos < len(keys) and keys[self.pos] in self.recs:
            self.pos += 1
        if self.ahead is None and self.pos < len(keys) and not full:
            # (with the counters read beside the values: block until the next job is done)
            waiter.pause(f"{len(keys) - self.pos} of {len(keys)} jobs not done",
                         until_done=None if self.done is None else self.done + 1)
        else:
            waiter.progressed()

    def _worth_asking(self) -> bool:
        """Whether to ask for the next window now: there is one, and jobs done since the last could fill it."""
        ahead = min(len(self.keys) - self.cursor, READ_CHUNK)
        if ahead <= 0 or self.done is not None and self.done - self.seen_done < ahead:
            return False
        self.seen_done = self.seen_done if self.done is None else self.done
        return True

    def _ask(self) -> None:
        """Start reading the values of the next window not read yet, and the run's done count."""
        window = [k for k in self.keys[self.cursor:self.cursor + READ_CHUNK] if k not in self.recs]
        self.ahead = window, self.state.store.get_many_soon(window + self.counters)
        self.cursor += READ_CHUNK
