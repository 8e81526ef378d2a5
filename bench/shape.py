"""
The shape of the tree, measured: the numbers issue 18 ("one room per job") names, as one JSON.

    uv run bench/shape.py [--out bench/results/shape-<date>.json]

Per product file (the commands at the root, harness/, analysis/, night/): lines, lines over 100
characters, functions over 60 lines; where each AUTORESEARCH_* variable is read; train.py's call
sites on the harness's `run` and the names it imports from prepare. Text and syntax only: nothing
is imported or run.
"""

import argparse
import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT_DIRS = ("harness", "analysis", "night")
MAX_LINE = 100            # characters: the project's line length
MAX_FUNCTION_LINES = 60   # a function longer than a screen does more than one thing
VARIABLE = re.compile(r"AUTORESEARCH_[A-Z0-9_]+")
# reading the environment: os.environ[...], os.environ.get(...), os.getenv(...)
ENV_READ = re.compile(r"os\.(environ\b|getenv\()")


def product_files(root: Path = ROOT) -> list:
    """The product's Python files, relative to `root`: the root's commands and the packages."""
    files = sorted(root.glob("*.py"))
    for folder in PRODUCT_DIRS:
        files += sorted((root / folder).glob("*.py"))
    return [f.relative_to(root) for f in files]


def long_functions(tree: ast.AST) -> dict:
    """Each function or method over MAX_FUNCTION_LINES lines (decorators excluded), by name."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found[f"{node.name}:{node.lineno}"] = length
    return found


def file_shape(path: Path) -> dict:
    text = path.read_text()
    lines = text.splitlines()
    return {"lines": len(lines), "long_lines": sum(len(line) > MAX_LINE for line in lines),
            "long_functions": long_functions(ast.parse(text))}


def variable_reads(root: Path, files: list) -> dict:
    """Each AUTORESEARCH_* name with the product files that mention it (a read, a message or a
    docstring); and the files that read the environment at all (os.environ, os.getenv)."""
    mentioned, readers = {}, []
    for rel in files:
        text = (root / rel).read_text()
        for name in sorted(set(VARIABLE.findall(text))):
            mentioned.setdefault(name, []).append(str(rel))
        if ENV_READ.search(text):
            readers.append(str(rel))
    return {"mentioned_in": mentioned, "environment_readers": readers}


def train_py_harness_use(path: Path) -> dict:
    """The names train.py imports from prepare, and its call sites on `run` (run.x(...) and
    start_run(...))."""
    tree = ast.parse(path.read_text())
    imported = [alias.name for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module == "prepare"
                for alias in node.names]
    calls = sorted(
        f"{node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id}:{node.lineno}"
        for node in ast.walk(tree) if isinstance(node, ast.Call) and (
            isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "run"
            or isinstance(node.func, ast.Name) and node.func.id == "start_run"))
    return {"imported_from_prepare": imported, "run_call_sites": calls}


def measure(root: Path = ROOT) -> dict:
    files = product_files(root)
    shapes = {str(f): file_shape(root / f) for f in files}
    harness = [s for f, s in shapes.items() if f.startswith("harness/") or f == "prepare.py"]
    harness_lines = sum(s["lines"] for s in harness)
    return {
        "files": shapes,
        "largest_file": max(shapes.items(), key=lambda kv: kv[1]["lines"])[0],
        "max_file_lines": max(s["lines"] for s in shapes.values()),
        "long_functions": {f"{f}:{name}": n for f, s in shapes.items()
                           for name, n in s["long_functions"].items()},
        "harness_long_line_percent": (100 * sum(s["long_lines"] for s in harness)
                                      / harness_lines if harness_lines else 0.0),
        "variables": variable_reads(root, files),
        "train_py": train_py_harness_use(root / "train.py"),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    text = json.dumps(measure(), indent=2) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
