"""Bad settings, as a user gets them wrong: each script, run for real, refuses at once with one
`error:` line and no traceback, before it trains, prepares or supervises anything."""

import json

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


# ---------------------------------------------------------------------------
# Settings are read once, in one place, and the limits of a run come in one order
# ---------------------------------------------------------------------------

PRODUCT = [*ROOT.glob("*.py"), *ROOT.glob("harness/*.py"), *ROOT.glob("analysis/*.py"), *ROOT.glob("night/*.py")]
SETTINGS_PY = ROOT / "harness" / "settings.py"


def environment_reads(path) -> list:
    """(line, what) of every read of the process environment in a file: os.environ.get(...), os.getenv(...),
    os.environ[...] (loaded, not assigned), `NAME in os.environ`."""
    import ast
    tree = ast.parse(path.read_text())
    reads = []
    for node in ast.walk(tree):
        environ = lambda n: (isinstance(n, ast.Attribute) and n.attr == "environ"  # noqa: E731
                             and isinstance(n.value, ast.Name) and n.value.id == "os")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args and (
                (node.func.attr == "get" and environ(node.func.value))
                or (node.func.attr == "getenv" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "os")):
            reads.append((node.lineno, ast.unparse(node.args[0])))
        elif isinstance(node, ast.Subscript) and environ(node.value) and isinstance(node.ctx, ast.Load):
            reads.append((node.lineno, ast.unparse(node.slice)))
        elif isinstance(node, ast.Compare) and any(environ(c) for c in node.comparators):
            reads.append((node.lineno, ast.unparse(node.left)))
    return reads


def test_every_autoresearch_variable_is_read_in_harness_settings_only():
    import re
    names = re.compile(r"""^['"]?AUTORESEARCH_[A-Z_]+['"]?$|^settings\.\w+_ENV$""")
    found = {path.relative_to(ROOT).as_posix(): [(line, what) for line, what in environment_reads(path)
                                                 if names.match(what)] for path in PRODUCT if path != SETTINGS_PY}
    assert {path: reads for path, reads in found.items() if reads} == {}
    assert len([r for r in environment_reads(SETTINGS_PY)]) >= 1  # the one reader reads


def test_each_variable_is_named_once_and_listed_in_the_readme_with_its_default():
    import ast
    import re
    from harness import settings
    variables = {v for k, v in vars(settings).items() if k.endswith("_ENV")}
    assert len(variables) >= 17 and all(v.startswith("AUTORESEARCH_") for v in variables)
    for path in PRODUCT:  # the names are spelled out in harness/settings.py only
        if path != SETTINGS_PY:
            literals = {n.value for n in ast.walk(ast.parse(path.read_text()))
                        if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            assert not literals & variables, (path, literals & variables)
    readme = (ROOT / "README.md").read_text()
    rows = {m[1]: m[2] for m in re.finditer(r"^\| `(AUTORESEARCH_\w+)` \| ([^|]+) \|", readme, flags=re.M)}
    assert variables <= set(rows), sorted(variables - set(rows))
    assert all(default.strip() for default in rows.values())


@pytest.mark.parametrize("script", ["analyze.py", "launch.py", "supervise.py"])
def test_every_command_refuses_a_bad_setting_the_same_way(script, tmp_path):
    for variable, value, what in (("AUTORESEARCH_TIME_BUDGET", "-1", "a positive number of seconds"),
                                  ("AUTORESEARCH_VERDICT", "greedy", "a verdict mode"),
                                  ("AUTORESEARCH_LAUNCHER", "k8s", "a launcher")):
        proc = run_script([str(ROOT / script), "status"] if script == "analyze.py" else [str(ROOT / script)],
                          cwd=tmp_path, env_extra={variable: value}, timeout=120)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert only_stderr_line(proc).startswith(f"error: {variable}={value!r} is not {what}")
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("budget, watchdog", [("300", None), ("3", None), ("60", "20")])
def test_the_watchdog_ends_a_hung_run_before_the_night_or_slurm_would(budget, watchdog, tmp_path):
    """The order of the limits of one run, as the night gets them: the harness's watchdog first (a hung run
    is recorded `timeout`, with its cause), then Slurm's --time and the night's kill, then the agent's tool."""
    env = {"AUTORESEARCH_TIME_BUDGET": budget, **({"AUTORESEARCH_WATCHDOG_S": watchdog} if watchdog else {})}
    code = ("import json, supervise\nfrom harness import settings\n"
            "args = supervise.parser().parse_args(['--backend', 'claude'])\n"
            "print(json.dumps({'watchdog': settings.WATCHDOG_S, 'kill': args.train_timeout, **settings.LIMITS}))")
    proc = run_script(["-c", code], cwd=ROOT, env_extra=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    limits = json.loads(proc.stdout)
    expected_watchdog = float(watchdog) if watchdog else 2 * float(budget) + 600  # README: 2 x budget + 10 min
    assert limits["watchdog"] == limits["watchdog_s"] == expected_watchdog
    assert limits["watchdog_s"] < limits["slurm_s"] <= limits["kill_s"] == limits["kill"] < limits["tool_s"]
    # an explicit --train-timeout that would kill before the watchdog is refused, one above it is taken
    low = run_script([str(ROOT / "supervise.py"), "--backend", "claude", "--train-timeout", str(expected_watchdog)],
                     cwd=tmp_path, env_extra=env, timeout=120)
    assert low.returncode == 2
    assert only_stderr_line(low).startswith(f"error: --train-timeout {expected_watchdog:g} must exceed train.py's "
                                            f"watchdog ({expected_watchdog:.0f} s")
    high = run_script([str(ROOT / "supervise.py"), "--backend", "claude", "--train-timeout",
                       str(expected_watchdog + 1)], cwd=tmp_path, env_extra=env, timeout=120)
    assert "run supervise.py in the repository root" in high.stderr  # past the check, stopped by the next one
