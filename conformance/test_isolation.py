"""Nothing a user names or raises reaches another run: keys no run name can
forge, the rule for job methods, exceptions that cannot be shown, bodies
framed like real ones, and large payloads in chunks on every backend."""

from __future__ import annotations

import itertools
import os
import pickle
import time

import pytest
from packmule.backends.base import Put

import packmule
from packmule._core import config as _config
from packmule._core.tracebacks import MESSAGE_MAX, TRACEBACK_MAX
from packmule._driver.runner import Runner
from packmule._model import keys as _keys
from packmule._model.keys import BLOB_FIELD, FAILED_FIELD, GLOBAL_PREFIXES, PATH_FIELDS, RUN_FIELDS
from packmule._transport.codec import signer_for

from .hostile import KINDS, TYPE_NAMES, Boom, Gate, Hostile
from .runners import lines

WAIT = 15  # s: far beyond what each wait needs; a broken backend fails the test through it


# --- keys ------------------------------------------------------------------------------------
def _fields() -> list[str]:
    """Every field the engine writes for a run generation, from the one place that names them."""
    return [*RUN_FIELDS, *(f + "0" for f in PATH_FIELDS), *(f + "0.1" for f in PATH_FIELDS), FAILED_FIELD + "1",
            BLOB_FIELD + "0123abcd"]


def test_keys_of_different_runs_never_meet_and_never_name_a_global_key():
    # Given names built to collide under any join with ':' (the old scheme)
    gens = ["0a1b2c3d", "ffffffff"]
    names = ["v", "v:0a1b2c3d", "pm", "pm-reg", "pm-blob", "pm-stats:done", "user", "recount", "v:0a1b2c3d:total",
             *(f"v:{g}:{f}" for g in gens for f in _fields())]
    owner: dict[str, tuple[str, ...]] = {}
    for name in names:
        _keys.check_name(name)
        keys = {("pointer", name): _keys.pointer(name)}
        keys.update({("field", name, gen, f): _keys.prefix(name, gen) + f for gen in gens for f in _fields()})
        for who, key in keys.items():
            # Then each key has one owner, and none is a registry or global key
            assert owner.setdefault(key, who) == who, f"{who} and {owner[key]} share the key {key!r}"
            assert not key.startswith(GLOBAL_PREFIXES), key
    assert all(key.split("/")[1] == who[1] for key, who in owner.items()), "a name is one whole segment of its keys"
    for a, b in itertools.product(names, repeat=2):
        assert _keys.user_lock(a) != _keys.recount_lock(b)


@pytest.mark.parametrize("name", ["v/0a1b2c3d/total", "v/x", "/", "pm/v"])
def test_a_name_with_the_key_separator_is_refused(backend, name):
    with pytest.raises(ValueError, match="letters, digits"):
        Gate(name, backend=backend)
    with pytest.raises(ValueError, match="letters, digits"):
        Gate(backend=backend).lock(name)


def test_no_run_name_built_from_another_runs_keys_reaches_it(backend, tmp_path):
    # Given a victim run in progress (its 6 jobs wait at a gate)
    gate = str(tmp_path / "gate")
    victim = Gate(f"victim-{os.urandom(3).hex()}", backend=backend)
    refs = victim.enqueue_each("held", range(6), gate)
    _, gen, _ = refs[0].parts
    # When runs named after each of its keys (every field the engine writes) are
    # forgotten before they exist, started, waited on, cancelled and forgotten
    for field in ["", *_fields()]:
        attacker = Gate(f"{victim.name}:{gen}" + (f":{field}" if field else ""), backend=backend)
        attacker.forget()
        attacker.enqueue("one", field)
        assert attacker.wait(timeout=WAIT) == "1.0 / 1.0"
        attacker.cancel()
        attacker.forget()
    # Then the victim completes with its exact counts and values
    assert victim.update_progress() == "0.0 / 6.0"
    open(gate, "w").close()
    assert victim.wait(timeout=WAIT) == "6.0 / 6.0"
    assert [victim.get_return_value(r) for r in refs] == [i * i for i in range(6)]


@pytest.mark.parametrize("make_id", [
    lambda gen: "victim/0a1b2c3d/0/extra",
    lambda gen: "victim/0a1b2c3d/0:cancel",
    lambda gen: "victim/not-a-gen/0",
    lambda gen: "victim/0a1b2c3d/cm:0",
    lambda gen: "bad name/0a1b2c3d/0",
])
def test_a_job_id_packmule_never_made_is_refused_and_queues_nothing(backend, make_id):
    runner = Gate(backend=backend)
    ref = packmule.JobRef.fast(make_id(""), "nowhere:1")
    with pytest.raises(ValueError, match="not a job id packmule made"):
        runner.get_return_value(ref)
    with pytest.raises(ValueError, match="not a job id packmule made"):
        runner.deferred_result("one", [ref])
    assert runner.update_progress() == "0.0 / 0.0"


# --- job methods -------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "why"), [
    ("__init__", "dunder"), ("__class__", "dunder"), ("__reduce_ex__", "dunder"), ("__call__", "dunder"),
    ("_options", "Runner's own"), ("_runner_blob", "Runner's own"), ("_pm_init", "Runner's own"),
    ("enqueue", "Runner's own"), ("wait", "Runner's own"), ("forget", "Runner's own"),
    ("prop", "not a method"), ("label", "not a method"), ("nope", "has no method"), ("mro", "has no method"),
])
def test_enqueue_refuses_what_is_not_a_job_method_naming_the_rule_with_nothing_queued(backend, method, why):
    runner = Hostile(backend=backend)
    with pytest.raises(ValueError, match=why):
        runner.enqueue(method)
    with pytest.raises(ValueError, match=why):
        runner.enqueue_each(method, [1, 2])
    with pytest.raises(ValueError, match=why):
        runner.deferred_result(method, [])
    assert backend.store.get_many([_keys.pointer(runner.name)]) == {}  # no run was even started


def test_a_single_underscore_method_of_the_users_class_runs_as_a_job(backend):
    runner = Hostile(backend=backend)
    ref = runner.enqueue("_private", 7)
    assert runner.wait(timeout=WAIT) == "1.0 / 1.0"
    assert runner.get_return_value(ref) == ("private", 7)


def test_a_signed_body_naming_a_refused_method_fails_its_job_and_never_calls_it(backend, tmp_path, monkeypatch):
    # Given a driver whose check is gone (an old or crafted one, signing with the right secret)
    monkeypatch.setattr(Runner, "_check_method", lambda self, method: None)
    path = str(tmp_path / "called")
    runner = Hostile(backend=backend)
    refs = [runner.enqueue("forget", path), runner.enqueue("__call__", path), runner.enqueue("_options")]
    # Then each job fails for good, saying why, and none was called
    assert runner.wait(timeout=WAIT) == "3.0 / 3.0"
    assert runner.update_progress().failed == 3
    for ref in refs:
        with pytest.raises(packmule.JobFailed) as err:
            runner.get_return_value(ref)
        assert err.value.exc_type == "RefusedMethod" and "not run" in err.value.message
    assert lines(path) == []


# --- whatever a job raises, the job ends ---------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_whatever_a_job_raises_it_fails_naming_the_type_and_the_run_completes(harness, tmp_path, kind):
    backend = harness.backend
    pids = sorted(harness.worker_pids())
    runner = Hostile(backend=backend, max_retries=0)
    path = str(tmp_path / "ran")
    first, bad, last = runner.enqueue("ok", 1), runner.enqueue("bad", kind, path), runner.enqueue("ok", 3)
    progress = runner.wait(timeout=WAIT)
    assert (progress.done, progress.total, progress.failed) == (3, 3, 1)
    with pytest.raises(packmule.JobFailed) as err:
        runner.get_return_value(bad)
    assert err.value.exc_type == TYPE_NAMES[kind]
    assert len(err.value.message) <= MESSAGE_MAX and len(err.value.traceback) <= TRACEBACK_MAX
    if kind in ("unshowable", "str_not_str"):
        assert "cannot be shown" in err.value.message
    if kind == "huge":
        assert "characters left out" in err.value.message
    assert (runner.get_return_value(first), runner.get_return_value(last)) == (1, 3)
    assert lines(path) == ["ran"]
    # and the workers that ran it still serve: the same processes, a new job runs
    assert sorted(harness.worker_pids()) == pids
    assert runner.deferred_result("ok", [first]) == [1]


@pytest.mark.parametrize("kind", ["unshowable", "system_exit", "keyboard_interrupt"])
def test_a_job_that_raises_what_cannot_be_shown_or_exits_is_retried_as_its_options_say(backend, tmp_path, kind):
    runner = Hostile(backend=backend, max_retries=2)
    path = str(tmp_path / "ran")
    runner.enqueue("bad", kind, path)
    progress = runner.wait(timeout=WAIT)
    assert (progress.done, progress.failed) == (1, 1)
    assert lines(path) == ["ran"] * 3


def test_a_return_value_whose_pickling_raises_system_exit_fails_its_job(backend):
    runner = Hostile(backend=backend)
    ref = runner.enqueue("returns_unpicklable_by_exit")
    assert runner.wait(timeout=WAIT) == "1.0 / 1.0"
    with pytest.raises(packmule.JobFailed) as err:
        runner.get_return_value(ref)
    assert err.value.exc_type == "UnstorableValue" and "SystemExit" in err.value.message


def test_a_return_value_that_pickles_but_cannot_be_unpickled_fails_its_job_not_its_readers(backend):
    # Given a job whose value pickles, but unpickling it raises (so every reader would)
    runner = Hostile(backend=backend)
    ref = runner.enqueue("fan_over_ununpicklable")
    # Then it fails for good, saying why, and so does the continuation over it; the run completes
    progress = runner.wait(timeout=WAIT)
    assert (progress.done, progress.total, progress.failed) == (2, 2, 2)
    with pytest.raises(packmule.JobFailed) as err:
        runner.get_return_value(ref)
    assert err.value.exc_type == "UnstorableValue" and "cannot be unpickled again" in err.value.message


def test_a_job_that_returns_a_job_ref_packmule_never_made_fails_and_its_run_completes(backend):
    runner = Hostile(backend=backend)
    ref = runner.enqueue("fan_over", "returns_forged_ref")
    progress = runner.wait(timeout=WAIT)
    assert (progress.done, progress.total, progress.failed) == (2, 2, 2)
    with pytest.raises(packmule.JobFailed) as err:
        runner.get_return_value(ref)
    assert err.value.exc_type == "BadJobRef" and "not a job id packmule made" in err.value.message


def test_a_deferred_result_inside_a_job_over_a_job_ref_packmule_never_made_fails_that_job(backend):
    runner = Hostile(backend=backend)
    ref = runner.enqueue("defer_on_forged_ref")
    assert runner.wait(timeout=WAIT) == "1.0 / 1.0"
    with pytest.raises(packmule.JobFailed) as err:
        runner.get_return_value(ref)
    assert err.value.exc_type == "ValueError" and "not a job id packmule made" in err.value.message


# --- bodies and payloads -----------------------------------------------------------------------------
def test_a_body_framed_as_a_real_one_but_with_a_wrong_tag_is_buried_and_never_unpickled(backend, tmp_path):
    # Given a body with the workers' own key id, a tag of the right length (but
    # wrong), and a valid pickle whose unpickling writes a file
    marker = tmp_path / "unpickled"
    body = signer_for(backend).key_id + bytes(32) + pickle.dumps(Boom(str(marker)))
    before = backend.queue.stats().buried
    backend.queue.put_many([Put("forged", body, 10)])
    deadline = time.monotonic() + WAIT
    while backend.queue.stats().buried == before:
        assert time.monotonic() < deadline, "the forged body was not set aside"
        time.sleep(0.05)
    assert not marker.exists()
    # and the drivers of that secret are not told that workers have another one
    runner = Hostile(backend=backend)
    runner.enqueue("ok", 1)
    assert runner.wait(timeout=WAIT) == "1.0 / 1.0"


def test_large_arguments_and_values_travel_in_chunks_and_come_back_whole(backend):
    # (the suite's harness sets PACKMULE_SPILL_ABOVE, so this runs the chunked path on every backend)
    limit = _config.spill_above()
    assert limit is not None and limit < 100_000, "the harness must set PACKMULE_SPILL_ABOVE below 100 kB"
    runner = Hostile(backend=backend)
    blobs = [os.urandom(5 * limit + 123) for _ in range(3)]
    refs = runner.enqueue_each("ok", blobs)
    assert runner.deferred_result("ok", refs) == blobs
    assert [runner.get_return_value(r) for r in refs] == blobs
