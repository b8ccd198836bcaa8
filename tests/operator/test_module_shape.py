"""The operator's module shape (issue 21): each module says its job in a docstring and stays
under 400 lines; the in-memory state is typed (no tuple-keyed dicts); adapter states come from
loraplex.manifest.AdapterState, not re-spelled."""
from __future__ import annotations

import ast
from pathlib import Path

import loraplex.operator.reconcile as reconcile

PACKAGE = Path(reconcile.__file__).parent
MODULES = sorted(PACKAGE.glob("*.py"))


def test_each_module_says_its_job_and_stays_short():
    assert MODULES
    for path in MODULES:
        source = path.read_text()
        assert ast.get_docstring(ast.parse(source)), f"{path.name} opens with no docstring"
        assert source.count("\n") <= 400, f"{path.name} has {source.count(chr(10))} lines"


def test_state_is_typed_and_states_come_from_the_schema():
    for path in MODULES:
        source = path.read_text()
        assert "dict[tuple" not in source, f"{path.name} keys a dict by tuple"
    constants = (PACKAGE / "constants.py").read_text()
    for state in ("REGISTERED", "LOADING", "HOST", "DEVICE", "FAILED"):
        assert f"STATE_{state}" not in constants, "adapter states belong to loraplex.manifest.AdapterState"
