"""A tick whose job cannot be queued, because the queue server is down when
the scheduler tries, is queued once the server is back, and runs once: the run
its failed attempt made (and took its job back from) does not pass for the
tick being queued.  Real servers."""

from __future__ import annotations

import collections
import contextlib
import os
from datetime import datetime, timedelta, timezone

import pytest

from conformance.harness import beanstalk_harness
from conformance.scheduled import ticks_file
from conformance.scheduled_more import Crashy
from packmule._core.errors import BackendUnavailable
from packmule._model.scheduled import DECLARED
from packmule.scheduling import Scheduler

WAIT = 60.0


def test_a_tick_whose_put_failed_while_beanstalkd_was_down_is_queued_when_it_is_back_and_runs_once() -> None:
    key = "Crashy.tick"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(ticks_file(key))
    with beanstalk_harness(concurrency=1) as h:
        clock = [datetime(2035, 2, 1, 0, 0, 0, 400_000, tzinfo=timezone.utc)]
        scheduler = Scheduler(h.backend, {key: DECLARED[key]}, clock=lambda: clock[0])
        scheduler.run_pass()  # (first sight)
        # Given beanstalkd down when a tick falls due
        h.extras["beanstalkd"].kill()
        clock[0] += timedelta(seconds=1)
        tick = clock[0].replace(microsecond=0)
        with pytest.raises(BackendUnavailable):
            scheduler.run_pass()
        # When it is back, on its binlog
        h.extras["beanstalkd"].start()
        scheduler.run_pass()
        # Then the tick was queued, and ran once
        name = f"Crashy.tick:{tick:%Y%m%dT%H%M%SZ}"
        assert scheduler.queued == [name]
        assert Crashy(name, backend=h.backend).wait(timeout=WAIT) == "1.0 / 1.0"
        with open(ticks_file(key)) as f:
            assert collections.Counter(line.split()[0] for line in f) == {f"{tick:%Y%m%dT%H%M%SZ}": 1}
