"""Every field packmule's code appends to a run's key prefix is one that
``packmule._keys`` names: the conformance suite tries a colliding run name
against each named field (``test_isolation.py``), so a field added to the code
without being named there would escape that check.  This reads the source."""

from __future__ import annotations

import pathlib
import re

import packmule
from packmule._model.keys import BLOB_FIELD, FAILED_FIELD, PATH_FIELDS, RUN_FIELDS

SOURCE = pathlib.Path(packmule.__file__).parent
# `p + "done"`, `o.p + "cm:" + path`, `prefix(name, gen) + "cancel"`, f"{p}f:{k}"
APPENDED = re.compile(r'(?:\bp|\.p|prefix\([^()]*\))\s*\+\s*"([A-Za-z_]+:?)')
FORMATTED = re.compile(r'f"\{(?:p|o\.p|prefix\([^()]*\))\}([A-Za-z_]+:?)')


def fields_in(text: str) -> set[str]:
    return {m.group(1) for pattern in (APPENDED, FORMATTED) for m in pattern.finditer(text)}


def test_the_pattern_finds_the_fields_of_each_way_of_writing_a_key():
    assert fields_in('k = p + "total"; j = o.p + "cm:" + path; f"{p}f:{n}"; prefix(a, b) + "cancel"') == {
        "total", "cm:", "f:", "cancel"}


def test_every_field_the_code_appends_to_a_run_prefix_is_named_in_packmule_keys():
    named = {*RUN_FIELDS, *PATH_FIELDS, FAILED_FIELD, BLOB_FIELD}
    used: dict[str, set[str]] = {}
    for path in sorted(SOURCE.rglob("*.py")):
        for name in fields_in(path.read_text()):
            used.setdefault(name, set()).add(str(path.relative_to(SOURCE)))
    assert {"total", "done", "v:", "cm:", "spec:"} <= set(used), "the pattern no longer finds the engine's keys"
    unnamed = {name: sorted(files) for name, files in used.items() if name not in named}
    assert not unnamed, f"fields written but not named in packmule/_keys.py (RUN_FIELDS/PATH_FIELDS): {unnamed}"
