"""Delayed jobs on beanstalkd live in its binlog: a server killed (``kill -9``)
and restarted on its binlog still has them, and those that fell due while it
was down run at once, counted once each.  Real servers, a real worker."""

from __future__ import annotations

import time
from typing import Any

from conformance.harness import beanstalk_harness
from conformance.runners import Timed, stamps

WAIT = 60.0


def test_delayed_jobs_survive_a_beanstalkd_restart_on_its_binlog_and_overdue_ones_run_at_once(tmp_path: Any) -> None:
    path = str(tmp_path / "stamps")
    with beanstalk_harness(concurrency=2) as h:
        server = h.extras["beanstalkd"]
        runner = Timed(backend=h.backend)
        # Given delayed jobs: some due while the server is down, some after it is back
        before = time.time()
        runner.enqueue_each("stamp", [path] * 5, "soon", delay=1.5)
        runner.enqueue_each("stamp", [path] * 5, "later", delay=6)
        assert h.backend.queue.stats().delayed == 2  # (two bundles)
        # When beanstalkd is killed, and restarted on its binlog once the first are overdue
        server.kill()
        time.sleep(3.0)
        server.start()
        restarted = time.time()
        # Then every job runs once, the overdue ones at once, the others at their time
        assert runner.wait(timeout=WAIT) == "10.0 / 10.0"
        ran = stamps(path)
        assert sorted(tag for tag, _ in ran) == ["later"] * 5 + ["soon"] * 5
        soon = [at for tag, at in ran if tag == "soon"]
        later = [at for tag, at in ran if tag == "later"]
        assert restarted <= min(soon) and max(soon) <= restarted + 5.0
        assert min(later) >= before + 6
