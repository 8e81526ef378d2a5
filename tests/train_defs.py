"""
Load train.py's definitions without running its training (used by the tests and bench/).

train.py is a script (the agent's file, read top to bottom), so it is taken apart structurally:
imports, class and function definitions and UPPER_CASE assignments are executed; everything else
(the logger, the device switch, setup and the training loop) is skipped.
"""

import ast
from pathlib import Path

TRAIN_PY = Path(__file__).resolve().parent.parent / "train.py"


def load_train_definitions(extra_globals=None, overrides=None) -> dict:
    """The classes, functions and UPPER_CASE constants of train.py; extra_globals fills names it
    defines only inside skipped blocks, overrides replace names after it ran (a test's recorder in
    place of a function train.py imports)."""
    source = TRAIN_PY.read_text()
    keep = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.ClassDef, ast.FunctionDef)):
            keep.append(node)
        elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets):
            keep.append(node)
    namespace = {"__name__": "train_definitions", **(extra_globals or {})}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(TRAIN_PY), "exec"), namespace)
    namespace.update(overrides or {})
    return namespace
