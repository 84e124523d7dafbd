"""The ``packmule`` command run with the project's settings: a child process
``python -m packmule ...`` that inherits the ``PACKMULE_*`` variables the app
exported at ready().  (The Django face does not import the CLI face: they are
independent siblings of packmule's top layer.)"""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str) -> None:
    code = subprocess.call([sys.executable, "-m", "packmule", *args])
    if code:
        sys.exit(code)
