"""The promises of ``Backend.ledger`` (a ``backends.base.Registers``), tested on
the ledger directly: one test per promise.  Schedules claim each tick in it with
a create-if-absent and keep their last tick with compare-and-set, so these are
what a schedule relies on.

Each test gets ``bare`` (conftest.py), as ``test_backend_contract.py``'s do; a
backend whose ``ledger`` is None cannot run schedules, and its tests here are
skipped, saying so.  Other processes are spawned, released together by a
barrier, and stamp their calls to prove they overlapped (``run_together``).
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from packmule.backends.base import Registers

from .harness import Harness
from .test_backend_contract import LATE, SPAWN, START, connect, overlapping, run_together

TTL = 600.0  # s: a ttl no test here outlives
SHORT = 1.0  # s: a ttl a test waits out (ZooKeeper's registers count whole seconds, rounded up)


def ledger_of(bare: Harness) -> Registers:
    ledger = bare.backend.ledger
    if ledger is None:
        pytest.skip(f"backend {bare.backend.name!r} has no ledger (Backend.ledger is None): it cannot run schedules")
    return ledger


def new_name(what: str) -> str:
    return f"contract-ledger:{what}:{os.urandom(4).hex()}"


def expired(ledger: Registers, name: str) -> tuple[bytes | None, Any]:
    """Read ``name`` until its value has expired (within ttl SHORT + LATE)."""
    deadline = time.monotonic() + SHORT + LATE
    while True:
        value, token = ledger.read(name)
        if value is None:
            return value, token
        assert time.monotonic() < deadline, f"a value written with ttl {SHORT}s still read as present"
        time.sleep(0.1)


# --- other processes ---------------------------------------------------------------------
def _creator(env: dict[str, str], names: list[str], tag: bytes, start: Any, out: Any) -> None:
    """Create each register with this process's tag if absent; report what it
    won, what it read back after each attempt, and when each attempt ran."""
    ledger = connect(env).ledger
    assert ledger is not None
    ledger.read("warmup")  # connected
    start.wait(START)
    won, seen, spans = [], {}, []
    for name in names:
        t0 = time.monotonic()
        if ledger.swap(name, None, tag, TTL):
            won.append(name)
        spans.append((t0, time.monotonic()))
        seen[name] = ledger.read(name)[0]
    out.put((tag, won, seen, spans))


def _writer(env: dict[str, str], name: str, value: bytes) -> None:
    """Create one register, then end (closing the backend, as a process that ends well does)."""
    backend = connect(env)
    assert backend.ledger is not None and backend.ledger.swap(name, None, value, TTL)
    backend.close()


# --- the promises ------------------------------------------------------------------------
def test_of_processes_creating_a_register_at_once_exactly_one_wins_and_all_read_its_value(bare: Harness) -> None:
    ledger = ledger_of(bare)
    names = [new_name(f"claim{i}") for i in range(30)]
    tags = [f"process {n}".encode() for n in range(4)]
    reports = run_together(_creator, [(bare.env, names, tag) for tag in tags])
    assert overlapping([spans for *_, spans in reports]) > 0, "the creates never overlapped: nothing was proven"
    winners: dict[str, list[bytes]] = {name: [] for name in names}
    for tag, won, _, _ in reports:
        for name in won:
            winners[name].append(tag)
    assert {name: len(w) for name, w in winners.items()} == dict.fromkeys(names, 1), "not exactly one winner each"
    for _, _, seen, _ in reports:
        assert seen == {name: w[0] for name, w in winners.items()}, "a process read another value than the winner's"
    assert {name: ledger.read(name)[0] for name in names} == {name: w[0] for name, w in winners.items()}


def test_a_swap_with_a_stale_token_fails_and_changes_nothing_and_with_the_current_one_succeeds(bare: Harness) -> None:
    ledger = ledger_of(bare)
    name = new_name("cas")
    assert ledger.swap(name, None, b"tick 1", TTL)
    stale = ledger.read(name)[1]
    assert ledger.swap(name, stale, b"tick 2", TTL)
    # a token of a read the register has changed since: no write, nothing changed
    assert not ledger.swap(name, stale, b"tick 3 (stale)", TTL)
    assert not ledger.swap(name, stale, None, TTL)
    assert not ledger.swap(name, None, b"tick 3 (create)", TTL)
    value, current = ledger.read(name)
    assert value == b"tick 2"
    # the current token writes
    assert ledger.swap(name, current, b"tick 3", TTL)
    assert ledger.read(name)[0] == b"tick 3"


def test_a_swap_to_none_deletes_the_register(bare: Harness) -> None:
    ledger = ledger_of(bare)
    name = new_name("delete")
    assert ledger.swap(name, None, b"claimed", TTL)
    assert ledger.swap(name, ledger.read(name)[1], None, TTL)
    assert ledger.read(name) == (None, None)
    assert ledger.swap(name, None, None, TTL)  # (none to delete: whether none is there)
    assert ledger.swap(name, None, b"claimed again", TTL)  # absent: created anew
    assert ledger.read(name)[0] == b"claimed again"


def test_a_value_past_its_ttl_reads_as_absent_and_can_be_created_again(bare: Harness) -> None:
    ledger = ledger_of(bare)
    name = new_name("expiry")
    assert ledger.swap(name, None, b"old", SHORT)
    assert ledger.read(name)[0] == b"old"
    _, token = expired(ledger, name)
    assert ledger.swap(name, token, b"new", TTL)  # the token of the read that found it expired
    assert ledger.read(name)[0] == b"new"


def test_prune_removes_expired_registers_and_keeps_the_others(bare: Harness) -> None:
    ledger = ledger_of(bare)
    stale, fresh = new_name("stale"), new_name("fresh")
    assert ledger.swap(stale, None, b"old", SHORT)
    assert ledger.swap(fresh, None, b"new", TTL)
    expired(ledger, stale)
    assert ledger.prune() >= 1
    assert ledger.read(stale) == (None, None)  # gone, not just expired
    assert ledger.read(fresh)[0] == b"new"


def test_the_ledger_outlives_the_process_that_wrote_it(bare: Harness) -> None:
    ledger = ledger_of(bare)
    name = new_name("durable")
    writer = SPAWN.Process(target=_writer, args=(dict(bare.env), name, b"written elsewhere"), daemon=True)
    writer.start()
    writer.join(START)
    assert writer.exitcode == 0, f"the writer process ended with {writer.exitcode}"
    assert ledger.read(name)[0] == b"written elsewhere"
    assert not ledger.swap(name, None, b"mine", TTL)  # still claimed
