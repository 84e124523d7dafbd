"""Signed pickles: everything a process reads back from a shared queue or store.

A signed blob is ``key id || HMAC-SHA256(secret, payload) || payload``.  ``loads``
checks the tag (in constant time) before it unpickles anything, so a forged or
unsigned blob is refused with :class:`Forged` and never reaches pickle.  The key
id (8 bytes of a keyed hash of the secret, no use for forging) only names which
secret signed a blob, so that a worker that refuses a job can say whose it was.
``signer_for(backend)``: the one Signer of a backend's secret.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import cloudpickle

from packmule._core.digests import HmacSha256, blake2b, compare_digest

if TYPE_CHECKING:
    from packmule.backends.base import Backend

__all__ = ["HEAD", "KEY_ID", "PROTOCOL", "TAG", "Forged", "Signer", "dumps", "key_id", "signer_for"]

KEY_ID = 8  # bytes naming the secret
TAG = 32  # bytes of HMAC-SHA256
HEAD = KEY_ID + TAG  # bytes before the payload
PROTOCOL = 5


class Forged(ValueError):
    """A blob whose HMAC does not match: it was not made with this secret.
    ``key_id`` is the hex key id the blob claims (unverified: a hint only)."""

    def __init__(self, message: str, key_id: str = "") -> None:
        super().__init__(message)
        self.key_id = key_id


def key_id(secret: bytes) -> bytes:
    return blake2b(secret, digest_size=KEY_ID, person=b"packmule-keyid").digest()


def dumps(obj: Any) -> bytes:
    """Pickle ``obj``; cloudpickle for anything beyond plain data, so runners,
    functions and classes defined in ``__main__`` or a notebook travel by value."""
    try:
        data = pickle.dumps(obj, PROTOCOL)  # plain data: 3x faster than cloudpickle
    except Exception:
        data = b"__main__"
    # pickle names things in __main__ by reference, which no worker can resolve
    if b"__main__" in data:
        data = cloudpickle.dumps(obj, PROTOCOL)
    return data


class Signer:
    """Signs and checks blobs with one secret."""

    __slots__ = ("_mac", "key_id")

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("the signing secret is empty")
        self._mac = HmacSha256(secret)  # (``packmule._core.digests``: no OpenSSL for small payloads)
        self.key_id = key_id(secret)

    def sign(self, payload: bytes) -> bytes:
        return self.sign_many([payload])[0]

    def sign_many(self, payloads: Iterable[bytes]) -> list[bytes]:
        """``sign`` of each payload, in one call (a worker signs a value per job)."""
        mac, kid = self._mac.digest, self.key_id
        return [kid + mac(payload) + payload for payload in payloads]

    def payload(self, blob: bytes) -> bytes:
        """The payload of a correctly signed blob; :class:`Forged` otherwise."""
        return self.payloads([blob])[0]

    def payloads(self, blobs: Iterable[bytes]) -> list[bytes]:
        """``payload`` of each blob, in one call: a driver checks its values by
        the thousand, and two Python calls per value would cost a sixth more."""
        mac, out = self._mac.digest, []
        for blob in blobs:
            payload = blob[HEAD:]
            if len(blob) < HEAD or not compare_digest(mac(payload), blob[KEY_ID:HEAD]):
                claimed = blob[:KEY_ID].hex() if len(blob) >= HEAD else ""
                raise Forged("signature mismatch: not made with this PACKMULE_SECRET (or tampered with)", claimed)
            out.append(payload)
        return out

    def dumps(self, obj: Any) -> bytes:
        return self.sign(dumps(obj))

    def dumps_many(self, objs: Iterable[Any]) -> list[bytes]:
        return self.sign_many(map(dumps, objs))

    def loads(self, blob: bytes) -> Any:
        return pickle.loads(self.payload(blob))

    def loads_many(self, blobs: Iterable[bytes]) -> list[Any]:
        """``loads`` of each blob; every one is checked before any is unpickled."""
        return list(map(pickle.loads, self.payloads(blobs)))


@functools.cache
def signer_for(backend: Backend) -> Signer:
    """The Signer of ``backend``'s secret, one per backend object."""
    return Signer(backend.secret())
