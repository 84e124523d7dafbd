"""The public surface: what ``import packmule`` offers, and its small value types."""

from __future__ import annotations

import pickle

import pytest
from packmule.backends import _choice

import packmule
from packmule._transport.codec import Forged, Signer


def test_public_names_are_pinned():
    assert sorted(packmule.__all__) == sorted([
        "BackendUnavailable", "Cancelled", "JobFailed", "JobRef", "NoWorkers", "NotReady", "PackMuleError",
        "Progress", "Runner", "RunStateLost", "SecretMismatch", "ValuesNotRecorded",
        "cron", "current_tick", "every", "run_schedules",
    ])
    for name in packmule.__all__:
        assert hasattr(packmule, name)


def test_progress_reads_like_the_ruby_original():
    p = packmule.Progress(53, 101, 2)
    assert p == "53.0 / 101.0"
    assert eval(p) == pytest.approx(53 / 101)
    assert (p.done, p.total, p.failed) == (53, 101, 2)
    assert p.fraction == pytest.approx(53 / 101)
    assert not p.complete and packmule.Progress(3, 3).complete and not packmule.Progress(0, 0).complete
    assert pickle.loads(pickle.dumps(p)).failed == 2


def test_jobref_refuses_a_malformed_id_or_empty_server():
    with pytest.raises(ValueError):
        packmule.JobRef("no-slashes", "local:1")
    with pytest.raises(ValueError):
        packmule.JobRef("a/b/c", "")
    ref = packmule.JobRef("run/gen/0.3", "127.0.0.1:11300")
    assert ref.parts == ("run", "gen", "0.3") and repr(ref) == (
        "JobRef(id='run/gen/0.3', server='127.0.0.1:11300')")


def test_a_signed_blob_round_trips_and_a_tampered_one_is_refused_before_unpickling():
    signer = Signer(b"secret")
    blob = signer.dumps({"a": 1})
    assert signer.loads(blob) == {"a": 1}
    with pytest.raises(Forged):
        signer.loads(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(Forged):
        Signer(b"other secret").loads(blob)
    with pytest.raises(Forged):
        signer.loads(b"short")


def test_an_unknown_backend_name_says_which_are_installed(monkeypatch):

    with pytest.raises(ValueError, match="installed backends: .*local"):
        _choice.backend_class("no-such-backend")


def test_a_job_failed_error_carries_the_remote_failure():
    err = packmule.JobFailed({"job": "r/g/1", "method": "snooze", "args": "(1,)", "exc_type": "KeyError",
                              "message": "'x'", "traceback": "Traceback ...\nKeyError: 'x'"})
    assert "snooze((1,))" in str(err) and "KeyError" in str(err) and "Traceback" in str(err)


def test_a_process_that_joins_a_second_local_backend_reaches_that_one_not_the_first():
    # A process that reached one local backend through the environment (a web app
    # in a test, a job's own process) and then is pointed at another must reach
    # the other, not keep a client of the first (which may have ended).
    from packmule.backends.local import ADDRESS_VAR, SECRET_VAR, LocalBackend

    def env_of(backend: LocalBackend) -> dict[str, str]:
        return {"PACKMULE_BACKEND": "local", ADDRESS_VAR: backend.address, SECRET_VAR: backend.secret().hex()}

    first = LocalBackend(workers=1)
    try:
        client = LocalBackend.from_env(env_of(first))
        client.store.set_many({"which": b"first"}, 60)
    finally:
        first.close()
    second = LocalBackend(workers=1)
    try:
        second.store.set_many({"which": b"second"}, 60)
        assert second.store.get_many(["which"]) == {"which": b"second"}  # (the posted set has applied)
        again = LocalBackend.from_env(env_of(second))
        assert again.store.get_many(["which"]) == {"which": b"second"}
    finally:
        second.close()


def test_a_client_that_goes_away_halfway_through_connecting_does_not_lock_out_the_others():
    # A worker killed while it connects leaves the coordinator a socket that closes
    # in the middle of the secret's handshake: every later client must still get in.
    import socket
    import threading

    from packmule.backends.local import LocalBackend, LocalClient

    backend = LocalBackend(workers=1)
    try:
        for _ in range(3):
            with socket.socket(socket.AF_UNIX) as half:
                half.connect(backend.address)  # and close at once, before answering the challenge
        got: list[object] = []
        joiner = threading.Thread(target=lambda: got.append(LocalClient(backend.address, backend.secret())),
                                  daemon=True)
        joiner.start()
        joiner.join(10)
        assert got, "a client could not connect within 10 s after one went away halfway through connecting"
        client = got[0]
        assert isinstance(client, LocalClient)
        client.store.set_many({"k": b"v"}, 60)
        assert client.store.get_many(["k"]) == {"k": b"v"}  # (a round trip: the posted set has applied)
        assert backend.store.get_many(["k"]) == {"k": b"v"}
        client.close()
    finally:
        backend.close()


def test_a_coordinator_that_never_answers_the_handshake_is_reported_not_waited_on_forever(tmp_path, monkeypatch):
    import socket

    from packmule.backends import local

    from packmule._core.errors import BackendUnavailable

    monkeypatch.setattr(local.client, "CONNECT_TIMEOUT", 0.5)
    address = str(tmp_path / "mute.sock")
    with socket.socket(socket.AF_UNIX) as mute:  # takes connections, never speaks
        mute.bind(address)
        mute.listen(4)
        with pytest.raises(BackendUnavailable, match="did not answer the secret's handshake within 0.5s"):
            local.LocalClient(address, b"k" * 32)


def test_get_backend_gives_one_backend_per_settings_and_another_once_a_setting_changes(monkeypatch):
    # (the cache key is read from the environment on every enqueue and wait of a runner made without backend=)
    settings = {"PACKMULE_BACKEND": "beanstalk", "PACKMULE_BEANSTALKD": "127.0.0.1:1",
                "PACKMULE_MEMCACHED": "127.0.0.1:2", "PACKMULE_ZOOKEEPER": "127.0.0.1:3",
                "PACKMULE_SECRET": "s" * 32}
    for var, value in settings.items():
        monkeypatch.setenv(var, value)
    made = []
    try:
        first = _choice.get_backend()
        made.append(first)
        assert _choice.get_backend() is first
        monkeypatch.setenv("PACKMULE_BEANSTALKD", "127.0.0.1:4")
        second = _choice.get_backend()
        made.append(second)
        assert second is not first and "127.0.0.1:4" in repr(second)
        monkeypatch.setenv("PACKMULE_BEANSTALKD", "127.0.0.1:1")
        assert _choice.get_backend() is first
    finally:
        with _choice._cache_lock:
            for key in [k for k, v in _choice._cache.items() if v in made]:
                del _choice._cache[key]
        for backend in made:
            backend.close()
