"""Small value types users hold: JobRef and Progress."""

from __future__ import annotations

__all__ = ["JobRef", "Progress"]


class JobRef(tuple[str, str]):
    """A reference to a queued job: ``(id, server)``.

    ``id`` is ``'<run name>/<generation>/<job path>'``: the job's logical
    identity, the same on every re-run of the job that enqueued it.
    ``server`` is the ``'host:port'`` of the job's preferred beanstalkd (the one
    that holds it, unless that server was down when the job was queued: then
    another does, see ``backends/beanstalk/queue.py``), or ``'local:<pid>'`` for
    the local coordinator.  Immutable, hashable, picklable.
    """

    __slots__ = ()

    def __new__(cls, id: str, server: str) -> JobRef:  # noqa: A002 - the documented field name
        if not isinstance(id, str) or id.count("/") != 2:
            raise ValueError(f"JobRef id must be 'run/generation/path', got {id!r}")
        if not server:
            raise ValueError("JobRef server must not be empty")
        return tuple.__new__(cls, (id, server))

    def __getnewargs__(self) -> tuple[str, str]:
        return (self[0], self[1])

    @classmethod
    def fast(cls, id: str, server: str) -> JobRef:  # noqa: A002
        """Build without checks (the engine's own, well-formed refs)."""
        return tuple.__new__(cls, (id, server))

    @property
    def id(self) -> str:
        return self[0]

    @property
    def server(self) -> str:
        return self[1]

    @property
    def parts(self) -> tuple[str, str, str]:
        """``(run name, generation, job path)``."""
        name, gen, path = self[0].split("/")
        return name, gen, path

    def __repr__(self) -> str:
        return f"JobRef(id={self[0]!r}, server={self[1]!r})"


class Progress(str):
    """``'<done>.0 / <total>.0'`` - a ``str`` (``eval`` gives the fraction,
    ``split(' / ')`` the counts, as in the Ruby original) with ``.done``,
    ``.total``, ``.failed`` and ``.fraction``."""

    done: int
    total: int
    failed: int

    def __new__(cls, done: int, total: int, failed: int = 0) -> Progress:
        self = str.__new__(cls, f"{float(done)} / {float(total)}")
        self.done, self.total, self.failed = done, total, failed
        return self

    def __getnewargs__(self) -> tuple[int, int, int]:  # type: ignore[override]
        return (self.done, self.total, self.failed)

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    @property
    def complete(self) -> bool:
        return self.total > 0 and self.done == self.total

