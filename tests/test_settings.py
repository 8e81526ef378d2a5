"""Bad settings, as a user gets them wrong: each script, run for real, refuses at once with one
`error:` line and no traceback, before it trains, prepares or supervises anything."""

import shutil

import pytest

import synthetic
from conftest import ROOT, run_script

BAD_SECONDS = ["abc", "-1", "0", "nan", "inf", ""]
SECONDS_VARIABLES = ["AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_WATCHDOG_S"]


def only_stderr_line(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {lines}"
    return lines[0]


def seconds_error(variable, value) -> str:
    return f"error: {variable}={value!r} is not a positive number of seconds"


@pytest.fixture
def scripts(tmp_path):
    """A copy of the scripts in a folder of their own: were a check missing, nothing runs in the repository."""
    synthetic.copy_harness(tmp_path, ("prepare.py", "train.py"))
    return tmp_path


@pytest.mark.parametrize("variable", SECONDS_VARIABLES)
@pytest.mark.parametrize("value", BAD_SECONDS)
@pytest.mark.parametrize("script", ["train.py", "prepare.py"])
def test_a_bad_number_of_seconds_is_one_error_line(scripts, script, variable, value):
    args = [script] + (["--offline", "--vocab-size", "300"] if script == "prepare.py" else [])
    proc = run_script(args, cwd=scripts, env_extra={variable: value, "AUTORESEARCH_CACHE": str(scripts / "cache")},
                      timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert only_stderr_line(proc) == seconds_error(variable, value)
    assert not (scripts / "cache" / "manifest.json").exists()
    assert not (scripts / "metrics.jsonl").exists() and not (scripts / "run_summary.json").exists()


@pytest.mark.parametrize("value", ["abc", "-1"])
def test_supervise_refuses_a_bad_time_budget(tmp_path, value):
    # run from an empty folder: were the check missing, it would stop at "run in the repository root"
    proc = run_script([str(ROOT / "supervise.py"), "--backend", "claude", "--hours", "0.01"], cwd=tmp_path,
                      env_extra={"AUTORESEARCH_TIME_BUDGET": value}, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert only_stderr_line(proc) == seconds_error("AUTORESEARCH_TIME_BUDGET", value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("n", ["0", "-2", "abc", "1.5"])
def test_status_n_must_be_a_positive_integer(tmp_path, n):
    proc = run_script([str(ROOT / "analyze.py"), "status", "-n", n], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert only_stderr_line(proc) == (f"error: analyze.py status: argument -n: {n!r} is not a positive integer "
                                      f"(see `uv run analyze.py status --help`)")
    assert proc.stdout == ""


def test_status_n_lists_that_many_latest_runs(tmp_path):
    from repos import analyze, fake_run, ledger, make_repo
    repo = make_repo(tmp_path / "repo")
    for seed in (1, 2, 3):
        fake_run(repo, 1.0 + seed / 1000, seed=seed)
        assert analyze(repo).returncode == 0
    run_ids = [r["run_id"] for r in ledger(repo)]
    out = analyze(repo, "status", "-n", "2").stdout.splitlines()
    listed = out[out.index("latest 2:") + 1:]
    assert [line.split()[0] for line in listed] == run_ids[-2:], out
