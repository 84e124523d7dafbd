"""Wakes on beanstalkd (``backends/beanstalk/wake.py``): what a wake leaves
behind when its listener is gone, on a real beanstalkd."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import greenstalk
import pytest
from packmule.backends.base import Listener

from conformance.harness import Harness, beanstalk_harness


@pytest.fixture
def idle() -> Iterator[Harness]:
    with beanstalk_harness(concurrency=0) as h:
        yield h


def _ready(h: Harness, tube: str) -> int:
    host, port = h.extras["beanstalkd"].address.split(":")
    with greenstalk.Client((host, int(port)), encoding=None) as client:
        try:
            return int(client.stats_tube(tube)["current-jobs-ready"])
        except greenstalk.NotFoundError:
            return 0


def _listen_in_a_thread(h: Harness) -> Listener:
    got: list[Listener] = []
    thread = threading.Thread(target=lambda: got.append(h.backend.queue.listen()))
    thread.start()
    thread.join(30)
    return got[0]


def test_a_wake_for_a_gone_listener_is_deleted_by_the_next_listener(idle: Harness) -> None:
    # Given a listener that is gone, and a wake put for it afterwards
    gone = _listen_in_a_thread(idle)
    gone.close()
    tube = gone.channel.rpartition("|")[2]
    idle.backend.queue.wake([gone.channel])
    assert _ready(idle, tube) == 1
    # When another listener starts
    fresh = _listen_in_a_thread(idle)
    # Then the gone listener's tube is empty, and the new one's channel works
    assert _ready(idle, tube) == 0
    idle.backend.queue.wake([fresh.channel])
    assert fresh.wait(10) is True
    fresh.close()


def test_a_live_listener_keeps_its_wakes_when_another_listener_starts(idle: Harness) -> None:
    first = _listen_in_a_thread(idle)
    idle.backend.queue.wake([first.channel])
    _listen_in_a_thread(idle).close()
    assert first.wait(10) is True
    first.close()
