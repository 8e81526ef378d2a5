"""Injected faults (issue 10, "Trustworthy results", and issue 19's fault injection): each test causes the
fault for real (a crash, a kill, a full disk, a git state, corrupt input, a removed lock file, a command in a
worker's worktree), then checks that nothing was lost or misreported and that the next command works."""

import json
import os
import re
import resource
import signal
import subprocess
import sys

import pytest

from harness import contract
import synthetic
from harness import git as git_ops
from analysis.runfiles import LOG_CUT_MARK, LOG_HEAD_BYTES, LOG_TAIL_BYTES
from analysis.store import Store
from repos import CRASH_LOG, GIT_ENV, analyze, commit_change, fake_run, git, head, ledger, night_repo

# these tests analyse runs written by tests/synthetic.py, which never trained
pytestmark = pytest.mark.usefixtures("accept_synthetic")

STORE = ".auto-log-research"
SYNTAX_ERROR = "def (\n"  # a train.py that dies before train.py's logger starts
KILLED_IN_IMPORTS = ("import os, signal\nprint('importing torch', flush=True)\n"
                     "os.kill(os.getpid(), signal.SIGKILL)\n")  # a kill before the logger starts


def strict_ledger(repo) -> list:
    """runs.jsonl parsed as strict JSON: NaN or Infinity anywhere fails the test."""
    def refuse(constant):
        raise ValueError(f"runs.jsonl holds {constant}: not strict JSON")
    text = (repo / STORE / "runs.jsonl").read_text()
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def leftovers(repo) -> list:
    """What a killed or failed call may leave behind: temporary files, archive folders with no ledger row."""
    store = Store(repo)
    temps = [str(p.relative_to(repo)) for p in (*repo.glob(f"{STORE}/**/.*.tmp"), *repo.glob(".*.tmp"))]
    return temps + store.orphans(store.read_ledger())


def run_to_log(repo, code: str) -> int:
    """Run `code` as train.py would be run (`python ... > run.log 2>&1`); returns its exit status."""
    with open(repo / "run.log", "w") as log:
        return subprocess.run([sys.executable, "-c", code], cwd=repo, stdout=log, stderr=subprocess.STDOUT,
                              timeout=120).returncode


def kept_baseline_and_a_worse_run(repo):
    """A kept baseline at the first commit, then a committed change whose run is worse: what discard undoes.
    Returns the baseline's commit."""
    fake_run(repo, 1.0)
    assert analyze(repo).returncode == 0
    assert analyze(repo, "keep").returncode == 0
    base = head(repo)
    commit_change(repo, "DEPTH = 8 ", "DEPTH = 12 ", "depth 12")
    fake_run(repo, 1.05, seed=9)
    assert analyze(repo).returncode == 0
    return base


def one_error_line(proc) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# ---------------------------------------------------------------------------
# 1, 2: a crash never reports another run's number, and every crash is its own row
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("death", [SYNTAX_ERROR, KILLED_IN_IMPORTS], ids=["SyntaxError", "killed in its imports"])
def test_a_crash_after_an_unanalyzed_run_never_reports_its_number(repo, death):
    _, earlier = fake_run(repo, 0.9)  # finished, but never analyzed
    assert run_to_log(repo, death) != 0
    proc = analyze(repo)
    assert proc.returncode == 0, proc.stderr
    entry = ledger(repo)[-1]
    assert entry["status"] == "crash" and entry["val_bpb"] is None and "0.9" not in proc.stdout
    folder = repo / STORE / entry["run_id"]
    assert not (folder / "run_summary.json").exists() and not (folder / "metrics.jsonl").exists()
    note = f"run_summary.json belongs to an earlier run (started at {earlier['started_at']}) that was never analyzed"
    assert any(n.startswith(note) for n in entry["notes"])
    assert note in (folder / "analysis.md").read_text()
    # the next commands work: the same files are refused, the next run is its own
    assert "already archived" in one_error_line(analyze(repo))
    fake_run(repo, 0.95, seed=2)
    assert analyze(repo).returncode == 0
    assert [(r["status"], r["val_bpb"]) for r in ledger(repo)] == [("crash", None), ("pending", 0.95)]


def test_a_run_log_older_than_the_summary_is_not_the_runs_and_the_number_stands(repo):
    fake_run(repo, 0.97)
    (repo / "run.log").write_text("a log of some earlier process\n")  # train.py ran without `> run.log`
    an_hour_ago = os.stat(repo / "run_summary.json").st_mtime - 3600
    os.utime(repo / "run.log", (an_hour_ago, an_hour_ago))
    proc = analyze(repo)
    assert proc.returncode == 0, proc.stderr
    entry = ledger(repo)[0]
    assert entry["status"] == "pending" and entry["val_bpb"] == 0.97
    assert any("run.log was last written before this run started" in n for n in entry["notes"])


@pytest.mark.parametrize("kind", ["SyntaxError", "killed at the same step"])
def test_two_identical_crashes_are_two_rows(repo, kind):
    records = synthetic.make_records(n_steps=20)
    for _ in range(2):
        if kind == "SyntaxError":
            run_to_log(repo, SYNTAX_ERROR)
        else:  # the same metrics and the same log, written again by a second run
            synthetic.write_run(repo, records, None, CRASH_LOG, truncate_metrics=True)
        proc = analyze(repo)
        assert proc.returncode == 0, proc.stderr
    first, second = ledger(repo)
    assert first["status"] == second["status"] == "crash" and first["run_id"] != second["run_id"]
    assert first["run_log_sha256"] == second["run_log_sha256"]
    assert first["run_log_mtime_ns"] != second["run_log_mtime_ns"]
    if kind != "SyntaxError":
        assert second["metrics_sha256"] == first["metrics_sha256"] is not None  # its own metrics, not the first's
    assert "already archived" in one_error_line(analyze(repo))
    assert len(ledger(repo)) == 2


# ---------------------------------------------------------------------------
# 3: a kill during the bookkeeping is repaired by the next call
# ---------------------------------------------------------------------------

KILL_AT_REPLACE = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
import analyze
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(dst) == sys.argv[1]:  # the moment a SIGKILL (OOM killer, kill -9) lands
        os.killpg(0, signal.SIGKILL)          # analyze.py and its drawing process
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.exit(analyze.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("killed_at", ["runs.jsonl", "results.tsv"])
def test_a_kill_inside_the_ledger_write_is_repaired_by_the_next_call(repo, killed_at):
    fake_run(repo, 1.0)
    assert analyze(repo).returncode == 0
    fake_run(repo, 0.99, seed=2)
    killed = subprocess.run([sys.executable, "-c", KILL_AT_REPLACE, killed_at], cwd=repo, capture_output=True,
                            text=True, env={**os.environ, **GIT_ENV}, start_new_session=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert leftovers(repo)  # what the kill left: a temporary file, and (before the row) an archive folder
    proc = analyze(repo)
    # the write's temporary file, and the drawing process's when the kill caught it writing a figure
    assert re.search(rf"note: removed [12] temporary file\(s\) left by killed processes: [^\n]*"
                     rf"\.{re.escape(killed_at)}\.\d+\.tmp", proc.stdout), proc.stdout
    if killed_at == "runs.jsonl":  # not recorded: the run, still in the working directory, is archived now
        assert proc.returncode == 0, proc.stderr
        assert "note: removed archive folder(s)" in proc.stdout
    else:  # recorded, but results.tsv was not rewritten
        assert "already archived" in one_error_line(proc)
        assert "note: rebuilt results.tsv from runs.jsonl" in proc.stdout
    assert [r["val_bpb"] for r in ledger(repo)] == [1.0, 0.99]
    assert [r["run_id"] for r in Store(repo).read_results_tsv()] == [r["run_id"] for r in ledger(repo)]
    assert leftovers(repo) == []


BLOCKED_COMMIT_EDITOR = 'printf "editing\\n"; cat >/dev/null; :'  # git's editor: says so, then waits for EOF


def test_a_git_killed_during_a_commit_is_waited_for_then_its_lock_removed(repo):
    base = kept_baseline_and_a_worse_run(repo)
    target = ledger(repo)[-1]
    # a git commit in the repository, holding .git/index.lock while its editor is open
    editing = subprocess.Popen(["git", "commit", "-a", "--allow-empty"], cwd=repo, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               env={**os.environ, **GIT_ENV, "GIT_EDITOR": BLOCKED_COMMIT_EDITOR})
    try:
        assert editing.stdout.readline() == "editing\n"
        lock = repo / ".git" / "index.lock"
        assert lock.exists()
        error = one_error_line(analyze(repo, "discard"))
        assert error == (f"error: .git/index.lock is held by a running git (pid {editing.pid}): "
                         f"wait for it to finish, then run the command again")
        assert ledger(repo)[-1]["status"] == "pending"
    finally:
        os.killpg(editing.pid, signal.SIGKILL)  # the git and its editor, killed mid-commit
        editing.wait(timeout=60)
    assert lock.exists()  # what a killed git leaves: every later commit would refuse
    proc = analyze(repo, "discard")
    assert proc.returncode == 0, proc.stderr
    assert "note: removed the stale .git/index.lock: left by a git that was killed" in proc.stdout
    assert not lock.exists()
    assert git(repo, "log", "-1", "--format=%s").strip() == f"revert to best {base}"
    assert [r["status"] for r in ledger(repo) if r["run_id"] == target["run_id"]] == ["discard"]


# ---------------------------------------------------------------------------
# 4: a full disk while archiving
# ---------------------------------------------------------------------------

def file_size_limit(limit: int):
    """preexec_fn: files may not grow past `limit` bytes; a write past it fails with EFBIG (SIGXFSZ ignored),
    as on a full disk."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_while_archiving_records_nothing_and_the_next_call_archives(repo):
    fake_run(repo, 0.98)
    limit = (repo / "metrics.jsonl").stat().st_size // 2  # the archive's copy of metrics.jsonl cannot be written
    proc = subprocess.run([sys.executable, "analyze.py"], cwd=repo, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **GIT_ENV}, preexec_fn=file_size_limit(limit))
    error = one_error_line(proc)
    assert re.match(rf"error: archiving run {head(repo)} failed writing .*metrics.jsonl \(File too large\): "
                    r"nothing was recorded; free space and run `uv run analyze\.py` again$", error), error
    assert ledger(repo) == [] and leftovers(repo) == []
    assert not (repo / STORE / head(repo)).exists()
    proc = analyze(repo)  # the limit lifted
    assert proc.returncode == 0, proc.stderr
    assert [(r["run_id"], r["val_bpb"], r["status"]) for r in ledger(repo)] == [(head(repo), 0.98, "pending")]
    assert (repo / STORE / head(repo) / "metrics.jsonl").read_bytes() == (repo / "metrics.jsonl").read_bytes()


FEW_STEPS = 40           # a short run: its metrics.jsonl is smaller than train.py
FILE_SLACK = 4096        # analysis.md, runs.jsonl, results.tsv: a few KB


def listed_figures(folder) -> list:
    """The figures a run's analysis.md lists."""
    return re.findall(r"^- \[([\w.-]+\.png)\]", (folder / "analysis.md").read_text(), re.M)


def test_a_full_disk_inside_the_plotting_is_one_note_and_the_next_call_draws_the_figures(repo):
    fake_run(repo, 1.0, n_steps=FEW_STEPS)
    assert analyze(repo).returncode == 0
    fake_run(repo, 0.99, seed=2, n_steps=FEW_STEPS)
    # every file the archive and the ledger get fits; the larger figures do not (checked below)
    limit = max((repo / name).stat().st_size for name in ("train.py", "metrics.jsonl")) + FILE_SLACK
    proc = subprocess.run([sys.executable, "analyze.py"], cwd=repo, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **GIT_ENV}, preexec_fn=file_size_limit(limit))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # no traceback
    run = ledger(repo)[-1]
    folder = repo / STORE / run["run_id"]
    notes = [line for line in proc.stdout.splitlines() if "figures" in line]
    assert len(notes) == 1 and re.match(
        rf"note: run {run['run_id']} is recorded, but not all its figures: \S+\.png could not be written "
        rf"\(File too large; the filesystem at /\S* has \d+ MB free\); free space there: the next "
        rf"`uv run analyze\.py` \(or keep, discard\) draws them$", notes[0]), proc.stdout
    assert [(r["val_bpb"], r["status"]) for r in ledger(repo)] == [(1.0, "pending"), (0.99, "pending")]
    assert leftovers(repo) == [] and "verdict:" in proc.stdout
    missing = [name for name in listed_figures(folder) if not (folder / name).exists()]
    assert missing, "the limit let every figure through: nothing was injected"
    fake_run(repo, 0.98, seed=3, n_steps=FEW_STEPS)  # the next run, the limit lifted
    proc = analyze(repo)
    assert proc.returncode == 0, proc.stderr
    assert f"note: drew the missing figures of {run['run_id']}" in proc.stdout, proc.stdout
    for name in missing:
        assert (folder / name).stat().st_size > 1000
    assert (repo / STORE / "progress.png").exists() and len(ledger(repo)) == 3
    assert "missing figures" not in analyze(repo, "status").stdout + analyze(repo, "keep").stdout


PROGRESS_LIMIT = 8192  # bytes: more than keep's ledger and insights.md, less than progress.png


def test_a_full_disk_drawing_progress_png_in_keep_is_a_note_and_the_keep_stands(repo):
    fake_run(repo, 1.0)
    assert analyze(repo).returncode == 0
    proc = subprocess.run([sys.executable, "analyze.py", "keep"], cwd=repo, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **GIT_ENV}, preexec_fn=file_size_limit(PROGRESS_LIMIT))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert re.search(rf"^note: {STORE}/progress\.png could not be written \(File too large; the filesystem at "
                     rf"/\S* has \d+ MB free\); free space there: the next `uv run analyze\.py` \(or keep, "
                     rf"discard\) draws it$", proc.stdout, re.M), proc.stdout
    assert [r["status"] for r in ledger(repo)] == ["keep"] and leftovers(repo) == []
    assert not (repo / STORE / "progress.png").exists()  # not left stale
    fake_run(repo, 0.99, seed=2)
    proc = analyze(repo)
    assert proc.returncode == 0, proc.stderr
    assert "note: drew the missing figures of progress.png" in proc.stdout, proc.stdout
    assert (repo / STORE / "progress.png").stat().st_size > 1000


# ---------------------------------------------------------------------------
# 5: non-finite and malformed inputs
# ---------------------------------------------------------------------------

def edit_metrics_line(repo, line_no: int, edit):
    """Replace line `line_no` (1-based) of metrics.jsonl by edit(record) (text, or bytes written raw)."""
    path = repo / "metrics.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    new = edit(json.loads(lines[line_no - 1]))
    lines[line_no - 1] = (new if isinstance(new, bytes) else new.encode()) + b"\n"
    path.write_bytes(b"".join(lines))


MALFORMED = {  # id: (what to change in a finished run's files, what analysis.md must name)
    "NaN in metrics": (lambda repo: edit_metrics_line(repo, 5, lambda r: json.dumps({**r, contract.TRAIN_LOSS: float("nan")})),
                       "line 5 of metrics.jsonl (step 4): train/loss=nan is not a finite number; skipped"),
    "Infinity in metrics": (lambda repo: edit_metrics_line(repo, 6, lambda r: json.dumps({**r, contract.STEP_TIME_MS: float("inf")})),
                            "line 6 of metrics.jsonl (step 5): perf/step_time_ms=inf is not a finite number; skipped"),
    "a string step": (lambda repo: edit_metrics_line(repo, 7, lambda r: json.dumps({**r, contract.STEP: "6"})),
                      "line 7 of metrics.jsonl (step '6'): step='6' is not a finite number; skipped"),
    "a null time_s": (lambda repo: edit_metrics_line(repo, 8, lambda r: json.dumps({**r, contract.TIME_S: None})),
                      "line 8 of metrics.jsonl (step 7): time_s=None is not a finite number; skipped"),
    "an array line": (lambda repo: edit_metrics_line(repo, 9, lambda r: json.dumps(list(r.values()))),
                      "line 9 of metrics.jsonl is not an object; skipped"),
    "binary garbage": (lambda repo: edit_metrics_line(repo, 10, lambda r: bytes(range(256)).replace(b"\n", b"")),
                       "line 10 of metrics.jsonl is not JSON"),
    "a binary run_summary.json": (lambda repo: (repo / "run_summary.json").write_bytes(bytes(range(256))),
                                  "run_summary.json is corrupt (Expecting value)"),
    "NaN mfu_percent in the summary": (lambda repo: fake_run(repo, mfu_percent=float("nan")),
                                       "run_summary.json's mfu_percent is not a finite number (NaN or infinite): "
                                       "recorded as null"),
    "data of the wrong type": (lambda repo: fake_run(repo, data="climbmix"),
                               "run_summary.json's data is str \"climbmix\", not an object: ignored"),
    "config of the wrong type": (lambda repo: fake_run(repo, config=[4, 0.04]),
                                 "run_summary.json's config is list [4, 0.04], not an object: ignored"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_inputs_are_reported_and_the_ledger_stays_strict_json(repo, case):
    fake_run(repo)
    break_it, named = MALFORMED[case]
    break_it(repo)
    proc = analyze(repo)
    assert proc.returncode == 0, proc.stderr
    (entry,) = strict_ledger(repo)
    folder = repo / STORE / entry["run_id"]
    assert named in (folder / "analysis.md").read_text()
    assert (folder / "loss_vs_step.png").stat().st_size > 1000 and (repo / STORE / "progress.png").exists()
    fake_run(repo, 0.99, seed=3)  # and the next run is judged against it as usual, with nothing to repair
    proc = analyze(repo)
    assert proc.returncode == 0 and "note:" not in proc.stdout, proc.stdout
    assert len(strict_ledger(repo)) == 2


# ---------------------------------------------------------------------------
# 6: a huge run.log
# ---------------------------------------------------------------------------

HUGE_LOG_BYTES = 64 << 20     # far past the head and tail analyze.py reads and archives
LOG_BLOCK = b"".join(b"step %05d | loss: 4.2 | a progress line of a chatty train.py\n" % i for i in range(16384))


@pytest.mark.parametrize("ending", ["finished", "crashed"])
def test_a_huge_run_log_is_hashed_whole_but_read_and_archived_bounded(repo, ending):
    if ending == "finished":
        fake_run(repo, 0.99)
        tail = b"---\nval_bpb: 0.990000\n"
    else:
        synthetic.write_run(repo, synthetic.make_records(n_steps=20), None, "")
        tail = CRASH_LOG.encode()
    with open(repo / "run.log", "ab") as f:  # the stamp line (finished: write_run's), then ~64 MB, then the end
        while f.tell() < HUGE_LOG_BYTES:
            f.write(LOG_BLOCK)
        f.write(tail)
    size = (repo / "run.log").stat().st_size
    proc = analyze(repo)
    assert proc.returncode == 0, proc.stderr
    entry = ledger(repo)[0]
    assert entry["run_log_sha256"] == contract.sha256_file(repo / "run.log")
    archived = (repo / STORE / entry["run_id"] / "run.log").read_bytes()
    marks = re.findall(rb"\n\[\.\.\. (\d+) bytes cut \.\.\.\]\n", archived)
    assert len(marks) == 1
    assert len(archived) <= LOG_HEAD_BYTES + LOG_TAIL_BYTES + len(LOG_CUT_MARK.format(n=size))
    assert len(archived) - len(LOG_CUT_MARK.format(n=int(marks[0]))) + int(marks[0]) == size  # nothing else lost
    assert archived.endswith(tail)
    if ending == "finished":  # the stamp line at its head is found: the run's own log, so its number stands
        assert entry["status"] == "pending" and entry["val_bpb"] == 0.99
    else:  # the traceback at its tail is found
        assert entry["status"] == "crash"
        assert entry["error"] == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


# ---------------------------------------------------------------------------
# 7: git states a commit must not happen in
# ---------------------------------------------------------------------------

def conflicting_side_branch(repo, base: str):
    """A branch `side` off the baseline changing the line the discarded run's commit changed."""
    branch = git(repo, "rev-parse", "--abbrev-ref", "HEAD").strip()
    git(repo, "checkout", "-q", "-b", "side", base)
    commit_change(repo, "DEPTH = 8 ", "DEPTH = 16 ", "depth 16")
    git(repo, "checkout", "-q", branch)
    return branch


def start_state(repo, state: str, base: str) -> tuple:
    """Put the repository into `state` for real; returns (the expected refusal's words, how to leave the state)."""
    branch = conflicting_side_branch(repo, base)
    if state == "detached HEAD":
        git(repo, "checkout", "-q", "--detach")
        return f"HEAD is detached (at {head(repo)}): a commit here would be on no branch; `git switch {branch}` first", \
            ("checkout", "-q", branch)
    command = {"merge": ("merge", "side"), "rebase": ("rebase", "side"), "cherry-pick": ("cherry-pick", "side")}[state]
    conflict = subprocess.run(["git", *command], cwd=repo, capture_output=True, text=True, env={**os.environ, **GIT_ENV})
    assert conflict.returncode != 0 and "CONFLICT" in conflict.stdout + conflict.stderr
    return f"a {state} is in progress (", (command[0], "--abort")


@pytest.mark.parametrize("state", ["merge", "rebase", "cherry-pick", "detached HEAD"])
def test_discard_refuses_a_git_state_a_commit_must_not_happen_in(repo, state):
    base = kept_baseline_and_a_worse_run(repo)
    before = ledger(repo)
    words, leave = start_state(repo, state, base)
    at = git(repo, "rev-parse", "HEAD")
    error = one_error_line(analyze(repo, "discard"))
    assert error.startswith(f"error: {words}") and error.endswith("then run the command again"), error
    assert ledger(repo) == before and git(repo, "rev-parse", "HEAD") == at  # nothing was done
    git(repo, *leave)
    proc = analyze(repo, "discard")
    assert proc.returncode == 0, proc.stderr
    assert (repo / "train.py").read_text() == git(repo, "show", f"{base}:train.py")
    assert ledger(repo)[-1]["status"] == "discard"


def test_a_failed_commit_marks_nothing_and_discard_again_finishes(repo):
    base = kept_baseline_and_a_worse_run(repo)
    hook = repo / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho 'pre-commit: refused' >&2\nexit 1\n")
    hook.chmod(0o755)
    error = one_error_line(analyze(repo, "discard"))
    assert error.startswith("error: git commit") and "pre-commit: refused" in error
    assert ledger(repo)[-1]["status"] == "pending"  # git failed first: the run is not marked discarded
    hook.unlink()
    proc = analyze(repo, "discard")
    assert proc.returncode == 0, proc.stderr
    assert git(repo, "log", "-1", "--format=%s").strip() == f"revert to best {base}"
    assert (repo / "train.py").read_text() == git(repo, "show", f"{base}:train.py")
    assert ledger(repo)[-1]["status"] == "discard"


@pytest.mark.parametrize("command", ["keep", "discard"])
def test_a_corrupt_claims_file_stops_keep_and_discard_before_the_ledger_changes(repo, command):
    kept_baseline_and_a_worse_run(repo)
    before, insights = ledger(repo), (repo / STORE / "notes" / "insights.md").read_text()
    claims_file = repo / STORE / "claims.json"
    claims_file.write_text('{"claims": [')  # cut short, as by a crash of an older writer
    error = one_error_line(analyze(repo, command))
    assert f"{claims_file.relative_to(repo)} is corrupt" in error, error
    assert ledger(repo) == before  # the ledger is a command's last write
    assert (repo / STORE / "notes" / "insights.md").read_text() == insights
    claims_file.unlink()
    proc = analyze(repo, command)
    assert proc.returncode == 0, proc.stderr
    assert ledger(repo)[-1]["status"] == command
    assert proc.stdout.startswith({"keep": "kept ", "discard": "discarded "}[command]), proc.stdout


# ---------------------------------------------------------------------------
# 8: discard checks the snapshot; keep checks the local modules train.py imports
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("commit_too", [False, True], ids=["snapshot altered", "snapshot and commit unusable"])
def test_discard_restores_only_the_code_that_ran(repo, commit_too):
    base = kept_baseline_and_a_worse_run(repo)
    best = ledger(repo)[0]
    (repo / STORE / best["run_id"] / "train.py").write_text("print('not the code that ran')\n")
    if commit_too:  # the best's commit is gone (history rewritten): nothing verifiable is left to restore
        store = Store(repo)
        store.write_ledger([{**r, "commit": "0000000"} if r["run_id"] == best["run_id"] else r for r in ledger(repo)])
        worse = (repo / "train.py").read_text()
        error = one_error_line(analyze(repo, "discard"))
        assert error.startswith(f"error: the best run {best['run_id']}'s train.py cannot be restored: its snapshot ")
        assert (repo / "train.py").read_text() == worse and ledger(repo)[-1]["status"] == "pending"
        return
    proc = analyze(repo, "discard")
    assert proc.returncode == 0, proc.stderr
    assert "is not the code that ran (its sha256 differs); train.py is restored from commit" in proc.stdout
    assert (repo / "train.py").read_text() == git(repo, "show", f"{base}:train.py")


def test_keep_refuses_a_run_whose_local_module_is_not_committed(repo):
    commit_change(repo, "import math\n", "import math\nimport helpers\n", "use helpers")
    (repo / "helpers.py").write_text("SCALE = 2\n")
    fake_run(repo)
    assert analyze(repo).returncode == 0
    run = ledger(repo)[-1]["run_id"]
    error = one_error_line(analyze(repo, "keep"))
    assert error == (f"error: run {run}'s train.py imports helpers.py, which is untracked: a kept run must be "
                     f"reproducible from its commit; commit helpers.py (`git add helpers.py && git commit`), "
                     f"train again (`{contract.TRAIN_COMMAND}`) and keep that run")
    git(repo, "add", "helpers.py")
    git(repo, "commit", "-qm", "add helpers")
    assert "which is not in the run's commit" in one_error_line(analyze(repo, "keep"))
    fake_run(repo, seed=2)  # a run of the commit that has it
    assert analyze(repo).returncode == 0
    (repo / "helpers.py").write_text("SCALE = 3\n")  # changed since: refused like any change but train.py's
    assert "uncommitted changes other than train.py (helpers.py)" in one_error_line(analyze(repo, "keep"))
    git(repo, "checkout", "helpers.py")
    assert analyze(repo, "keep").returncode == 0
    assert ledger(repo)[-1]["status"] == "keep"


def test_local_imports_are_the_modules_beside_train_py(tmp_path):
    for name in ("helpers.py", "prepare.py", "harness/__init__.py", "pkg/__init__.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    code = ("import os, helpers\nimport pkg.sub as s\nfrom prepare import start_run\nimport harness.metric\n"
            "def f():\n    from pkg import x\n    import numpy\n")
    assert git_ops.local_imports(code, tmp_path) == ["helpers.py", "pkg"]


# ---------------------------------------------------------------------------
# 9: analyze while train.py is still running
# ---------------------------------------------------------------------------

HOLD_RUN_LOCK = f"""
import fcntl, os, sys
lock = open({contract.RUN_LOCK_FILE!r}, "a+")  # as the harness's run logger holds it for a run's lifetime
fcntl.flock(lock, fcntl.LOCK_EX)
lock.truncate(0)
lock.write(f"{{os.getpid()}}\\n")
lock.flush()
print("locked", flush=True)
sys.stdin.read()
"""


def test_analyze_refuses_while_train_py_runs_in_the_directory(repo):
    fake_run(repo, 0.99)
    training = subprocess.Popen([sys.executable, "-c", HOLD_RUN_LOCK], cwd=repo, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    try:
        assert training.stdout.readline() == "locked\n"
        error = one_error_line(analyze(repo))
        assert error == (f"error: a run is still training in {repo.resolve()} (pid {training.pid}): wait for it "
                         f"to finish, then run analyze.py")
        assert ledger(repo) == []
    finally:
        training.stdin.close()
        training.wait(timeout=60)
    proc = analyze(repo)  # the run ended: its lock file stays, unlocked
    assert proc.returncode == 0, proc.stderr
    assert [r["val_bpb"] for r in ledger(repo)] == [0.99]


# ---------------------------------------------------------------------------
# 10: the store's lock file removed while a writer holds it
# ---------------------------------------------------------------------------

HOLD_STORE_LOCK = """
import sys
sys.path.insert(0, sys.argv[1])
from analysis.store import Store
with Store(sys.argv[1]).lock():  # as a writer holds it for one command
    print("held", flush=True)
    sys.stdin.read()
"""
TRY_STORE_LOCK = """
import sys
sys.path.insert(0, sys.argv[1])
from analysis.store import Store
with Store(sys.argv[1]).lock(timeout=0):  # one try: taken, or refused at once
    print("taken", flush=True)
"""


def test_removing_the_lock_file_while_a_writer_holds_it_lets_no_second_writer_in(repo):
    fake_run(repo, 1.0)
    assert analyze(repo).returncode == 0
    before = ledger(repo)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_STORE_LOCK, str(repo)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        (repo / STORE / ".lock").unlink()  # e.g. `rm .auto-log-research/.lock`, or a cleanup script
        second = subprocess.run([sys.executable, "-c", TRY_STORE_LOCK, str(repo)], capture_output=True,
                                text=True, timeout=120)
        assert second.returncode != 0 and "taken" not in second.stdout, second.stdout
        assert f"another analyze.py has held {STORE}/.lock" in second.stderr.replace(f"{repo}/", ""), \
            second.stderr
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert holder.returncode == 0
    second = subprocess.run([sys.executable, "-c", TRY_STORE_LOCK, str(repo)], capture_output=True,
                            text=True, timeout=120)
    assert second.stdout == "taken\n", second.stderr  # released with the holder
    fake_run(repo, 0.99, seed=2)  # and the next command works, with nothing lost
    assert analyze(repo).returncode == 0
    assert [r["val_bpb"] for r in ledger(repo)] == [r["val_bpb"] for r in before] + [0.99]


# ---------------------------------------------------------------------------
# 11: a refusal names program.md's command, and a failed write the file the user knows
# ---------------------------------------------------------------------------

def test_keep_of_uncommitted_code_names_program_mds_training_command(repo):
    commit_change(repo, "DEPTH = 8 ", "DEPTH = 9 ", "depth 9")
    (repo / "train.py").write_text((repo / "train.py").read_text().replace("DEPTH = 9 ", "DEPTH = 10 "))
    fake_run(repo, dirty=True)  # a run of an edit never committed
    assert analyze(repo).returncode == 0
    error = one_error_line(analyze(repo, "keep"))
    assert error == (f"error: run {head(repo)} did not run a committed train.py (commit {head(repo)}): "
                     f"commit train.py, train again (`{contract.TRAIN_COMMAND}`) and keep that run")
    assert ledger(repo)[-1]["status"] == "pending"


REPORT_LIMIT = 4096  # bytes: far less than any report.html, more than anything `report` reads


def test_a_failed_report_write_names_report_html_and_the_next_report_is_written(repo):
    fake_run(repo, 1.0)
    assert analyze(repo).returncode == 0
    assert analyze(repo, "report").returncode == 0
    report = repo / STORE / "report.html"
    before = report.read_bytes()
    fake_run(repo, 0.99, seed=2)
    assert analyze(repo).returncode == 0
    proc = subprocess.run([sys.executable, "analyze.py", "report"], cwd=repo, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **GIT_ENV}, preexec_fn=file_size_limit(REPORT_LIMIT))
    error = one_error_line(proc)
    assert error == (f"error: {STORE}/report.html: File too large; fix that (free space, permissions) and run "
                     f"the command again"), error
    assert report.read_bytes() == before and leftovers(repo) == []  # the last report stands whole
    proc = analyze(repo, "report")  # the limit lifted
    assert proc.returncode == 0, proc.stderr
    assert report.read_bytes() != before and "0.99" in report.read_text()


# ---------------------------------------------------------------------------
# 12: a command in a worker's worktree, run without the worker's variables
# ---------------------------------------------------------------------------

def test_keep_in_a_workers_worktree_without_its_variables_acts_on_that_worktrees_run(tmp_path):
    from test_workers import add_worktree, analyze as analyze_as, edit_and_commit
    repo = night_repo(tmp_path / "repo")
    fake_run(repo, 1.0)  # the main worker: a kept baseline, then a better run it discarded
    assert analyze(repo).returncode == 0 and analyze(repo, "keep").returncode == 0
    commit_change(repo, "DEPTH = 8 ", "DEPTH = 10 ", "depth 10")
    fake_run(repo, 0.98, seed=3)
    assert analyze(repo).returncode == 0 and analyze(repo, "discard").returncode == 0
    tree = add_worktree(repo, "gpu0")  # worker gpu0, as the night makes it
    edit_and_commit(tree, "DEPTH = 8 ", "DEPTH = 12 ", "depth 12")
    fake_run(tree, 0.99, seed=43)
    assert analyze_as(tree, worker="gpu0").returncode == 0
    before = {r["run_id"]: r["status"] for r in ledger(repo)}
    proc = analyze(tree, "keep")  # by hand in gpu0's worktree, without AUTORESEARCH_WORKER
    assert proc.returncode == 0, proc.stderr
    own = [r for r in ledger(repo) if r["worker"] == "gpu0"][-1]
    assert proc.stdout.startswith(f"kept {own['run_id']} "), proc.stdout
    after = {r["run_id"]: r["status"] for r in ledger(repo)}
    assert after == {**before, own["run_id"]: "keep"}  # main's discarded run stays discarded
    fake_run(tree, 0.995, seed=44)  # and a run analyzed there without the variables is gpu0's too
    assert analyze(tree).returncode == 0
    assert ledger(repo)[-1]["worker"] == "gpu0"
    other = add_worktree(repo, "gpu1")  # a worker with no run yet: nothing of another's is touched
    before = ledger(repo)
    error = one_error_line(analyze(other, "keep"))
    assert error.startswith("error: worker gpu1 has no run yet to act on"), error
    assert ledger(repo) == before
