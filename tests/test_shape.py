"""
The tree keeps the shape issue 18 gave it: files of one screen's job, short functions, the
harness's lines ≤ 100 characters, train.py's instrumentation a few calls on one object
(measured by bench/shape.py, first shown to see what it measures on a tree of its own).
"""

import sys
import textwrap

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import shape  # noqa: E402

MAX_FILE_LINES = 600      # templates and tests aside
MAX_TRAIN_PY_CALL_SITES = 8
MAX_TRAIN_PY_IMPORTS = 8


def test_the_measure_sees_long_functions_long_lines_and_train_pys_calls(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(60))  # 60 lines + the def: 61
    (tmp_path / "harness").mkdir()
    (tmp_path / "harness" / "settings.py").write_text(
        f"def long():\n{body}\n\n\ndef short():\n    return 1\n" + "y = '" + "a" * 100 + "'\n")
    (tmp_path / "train.py").write_text(textwrap.dedent("""\
        import os
        from prepare import TIME_BUDGET, start_run
        run = start_run(globals())
        SEED = int(os.environ.get("SEED", 1))
        run.log_step({})
        run.log_step({})
        other.finish()
        """))
    (tmp_path / "prepare.py").write_text("AUTORESEARCH = 'AUTORESEARCH_CACHE'\n")
    measured = shape.measure(tmp_path)
    assert measured["long_functions"] == {"harness/settings.py:long:1": 61}
    assert measured["files"]["harness/settings.py"]["long_lines"] == 1
    assert measured["max_file_lines"] == 66 and measured["largest_file"] == "harness/settings.py"
    assert round(measured["harness_long_line_percent"], 2) == 1.49  # 1 of 66 + 1 (prepare.py)
    assert measured["train_py"] == {"imported_from_prepare": ["TIME_BUDGET", "start_run"],
                                    "run_call_sites": ["log_step:5", "log_step:6", "start_run:3"]}
    assert measured["variables"] == {"mentioned_in": {"AUTORESEARCH_CACHE": ["prepare.py"]},
                                     "environment_readers": ["train.py"]}


def test_the_tree_keeps_its_shape():
    measured = shape.measure()
    assert "harness/runlog.py" in measured["files"] and "night/supervisor.py" in measured["files"]
    too_long = {f: s["lines"] for f, s in measured["files"].items() if s["lines"] > MAX_FILE_LINES}
    assert too_long == {}, "split these files: one job each"
    assert measured["long_functions"] == {}, "split these functions"
    harness_long = {f: s["long_lines"] for f, s in measured["files"].items()
                    if f.startswith("harness/") and s["long_lines"]}
    assert harness_long == {}, "harness lines over 100 characters"
    train = measured["train_py"]
    assert len(train["run_call_sites"]) <= MAX_TRAIN_PY_CALL_SITES, train
    assert len(train["imported_from_prepare"]) <= MAX_TRAIN_PY_IMPORTS, train
    assert "harness/settings.py" in measured["variables"]["environment_readers"]
