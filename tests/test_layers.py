"""packmule's layers (ARCHITECTURE.md) hold: no import cycle among its modules,
whether at module level or inside a function, and the import-linter contracts
of ``.importlinter`` are kept.  Both read packmule in its installed layout
(``scripts/in_layout.py``: ``backends/`` and ``conformance/`` inside ``packmule/``),
in a process of their own, since this one imports packmule through the editable
install."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_spec = importlib.util.spec_from_file_location("in_layout", REPO / "scripts" / "in_layout.py")
assert _spec is not None and _spec.loader is not None
in_layout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(in_layout)

# The strongly connected components of more than one module in packmule's import
# graph (every import statement, at module level or in a function; those under
# TYPE_CHECKING are for the type checker only), found by Tarjan's algorithm.
CYCLES = r"""
import json, sys
import grimp

graph = grimp.build_graph("packmule", exclude_type_checking_imports=True)
index, low, stack, on_stack, cycles = {}, {}, [], set(), []
sys.setrecursionlimit(10_000)

def visit(module):
    index[module] = low[module] = len(index)
    stack.append(module)
    on_stack.add(module)
    for imported in graph.find_modules_directly_imported_by(module):
        if imported not in index:
            visit(imported)
            low[module] = min(low[module], low[imported])
        elif imported in on_stack:
            low[module] = min(low[module], index[imported])
    if low[module] == index[module]:
        component = []
        while True:
            member = stack.pop()
            on_stack.discard(member)
            component.append(member)
            if member == module:
                break
        if len(component) > 1:
            cycles.append(sorted(component))

for module in sorted(graph.modules):
    if module not in index:
        visit(module)
print(json.dumps({"modules": len(graph.modules), "cycles": cycles}))
"""


def _in_layout(tmp_path: Path, *command: str) -> subprocess.CompletedProcess[str]:
    layout = in_layout.build(tmp_path, conformance=True)
    env = dict(os.environ, PYTHONPATH=str(layout))
    return subprocess.run(command, cwd=layout, env=env, capture_output=True, text=True, timeout=120)


def test_no_import_cycle_among_packmules_modules(tmp_path: Path) -> None:
    run = _in_layout(tmp_path, sys.executable, "-c", CYCLES)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert found["modules"] > 70  # (packmule, its backends and its conformance suite)
    assert found["cycles"] == []


def test_the_import_contracts_are_kept(tmp_path: Path) -> None:
    # (lint-imports, run by this interpreter: its script may live elsewhere on PATH)
    lint_imports = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    run = _in_layout(tmp_path, sys.executable, "-c", lint_imports, str(REPO / ".importlinter"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout
