"""Run a command in packmule's installed layout: ``packmule/`` with ``backends/``
(and, with ``--conformance``, ``conformance/``) inside it, as pyproject.toml's
``package-dir`` installs them, made of symlinks to the repository's files in a
temp dir that is first on ``PYTHONPATH`` and the command's working directory.

The tools that read packmule from disk, not through the editable install's
import hook (mypy, grimp, import-linter), see ``packmule.backends.*`` there as
the real modules they are; paths they print are relative to the layout
(``packmule/backends/local/client.py`` is ``backends/local/client.py``).

    python scripts/in_layout.py python -m mypy --config-file "$PWD/pyproject.toml" -p packmule
    python scripts/in_layout.py --conformance lint-imports --config "$PWD/.importlinter"
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAPPED = {"backends": "backends", "conformance": "conformance"}  # pyproject.toml: packmule.<key> = <value>/


def build(into: Path, conformance: bool = False) -> Path:
    """The layout under ``into``; returns ``into``."""
    top = into / "packmule"
    top.mkdir()
    for entry in (REPO / "packmule").iterdir():
        if entry.name != "__pycache__":
            (top / entry.name).symlink_to(entry)
    for name, folder in MAPPED.items():
        if name != "conformance" or conformance:
            (top / name).symlink_to(REPO / folder)
    return into


def main(argv: list[str]) -> int:
    conformance = argv[:1] == ["--conformance"]
    command = argv[1:] if conformance else argv
    if not command:
        print(__doc__, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="packmule-layout-") as tmp:
        layout = build(Path(tmp), conformance)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(layout), os.environ.get("PYTHONPATH")])))
        return subprocess.call(command, cwd=layout, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
