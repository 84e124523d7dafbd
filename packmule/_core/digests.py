"""BLAKE2b and HMAC-SHA256 without loading OpenSSL for small inputs.

``hashlib`` and ``hmac`` load OpenSSL's libcrypto when imported, and its start-up
costs each process about 3.6 MiB of memory of its own (a fresh interpreter's
USS with and without it).  A worker process needs only BLAKE2b (names, keys,
rendezvous hashing) and HMAC-SHA256 (each value it signs), and CPython carries
both itself (``_blake2``, ``_sha256``).  For the small payloads that a worker
signs by the thousand the builtin SHA-256 is also faster: 0.78 us against 1.11
for an HMAC of 100 bytes (no OpenSSL object per call).  OpenSSL's is 5x faster
on large ones (0.62 against 3.4 ms for 1 MiB), so a payload of ``LARGE`` bytes
or more goes to ``hmac``, imported then.  Both compute the same HMAC (RFC 2104).
"""

from __future__ import annotations

from typing import Any

try:
    from _blake2 import blake2b
    from _operator import _compare_digest as compare_digest
    from _sha256 import sha256 as _sha256
except ImportError:  # (an interpreter without them: the same digests, through hashlib)
    from hashlib import blake2b
    from hashlib import sha256 as _sha256
    from hmac import compare_digest  # type: ignore[no-redef]

__all__ = ["LARGE", "HmacSha256", "blake2b", "compare_digest"]

LARGE = 64 * 1024  # bytes from which a payload's HMAC is OpenSSL's
_BLOCK = 64  # SHA-256's block size


class HmacSha256:
    """HMAC-SHA256 with one key: the padded key's two hash states made once, copied per payload."""

    __slots__ = ("_inner", "_key", "_large", "_outer")

    def __init__(self, key: bytes) -> None:
        self._key = key
        if len(key) > _BLOCK:
            key = _sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self._inner = _sha256(bytes(b ^ 0x36 for b in key))
        self._outer = _sha256(bytes(b ^ 0x5C for b in key))
        self._large: Any = None

    def digest(self, payload: bytes) -> bytes:
        if len(payload) >= LARGE:
            return self._openssl(payload)
        inner = self._inner.copy()
        inner.update(payload)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()  # type: ignore[no-any-return]

    def _openssl(self, payload: bytes) -> bytes:
        if self._large is None:
            import hmac

            self._large = hmac.new(self._key, digestmod="sha256")
        mac = self._large.copy()
        mac.update(payload)
        return mac.digest()  # type: ignore[no-any-return]
