"""``tests/mutation_check.py`` plants each of its defects by replacing a text that
must occur exactly once in its file: a change to that code must change the
defect too, or the check stops at that defect.  Checked here, on every run of the
suite (the check itself takes an hour)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mutation_check  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("defect", mutation_check.DEFECTS, ids=lambda d: f"{d.name} ({d.file})")
def test_each_defect_s_text_occurs_once_in_its_file(defect: mutation_check.Defect) -> None:
    with open(os.path.join(ROOT, defect.file)) as f:
        text = f.read()
    assert text.count(defect.old) == 1, (
        f"{defect.file}: the text the defect {defect.name!r} replaces occurs {text.count(defect.old)} times; "
        "update tests/mutation_check.py to the code as it is now")
