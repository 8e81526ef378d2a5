"""analyze.py as the agent runs it, in temporary git repositories holding synthetic runs: archives,
crash handling, the ledger, the verdict, the bookkeeping commands and their refusals, and plots."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import synthetic
from harness import contract
from analysis import plots, report, stats
from analysis.runfiles import read_metrics
from analysis.store import Store
from repos import CRASH_LOG, GIT_ENV, analyze, baseline, commit_change, fake_run, git, head, ledger, train_sha

# these tests analyse runs written by tests/synthetic.py, which never trained
pytestmark = pytest.mark.usefixtures("accept_synthetic")

# ---------------------------------------------------------------------------
# Archive and ledger
# ---------------------------------------------------------------------------

def test_run_is_archived_with_ledger_row(repo):
    records, summary = fake_run(repo, 0.995)
    proc = analyze(repo)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) <= report.STDOUT_MAX_LINES
    assert "0.995000" in proc.stdout and "verdict: KEEP" in proc.stdout
    run_id = head(repo)
    folder = repo / ".auto-log-research" / run_id
    for name in ("run_summary.json", "metrics.jsonl", "run.log", "train.py", "diff.patch", "analysis.md",
                 "loss_vs_step.png", "loss_vs_time.png", "val_bpb.png", "schedules.png", "perf.png",
                 "layer_grad_norm.png"):
        assert (folder / name).exists(), name
    assert (repo / ".auto-log-research" / "progress.png").exists()
    assert (folder / "train.py").read_text() == (repo / "train.py").read_text()
    rows = Store(repo).read_results_tsv()
    assert list(rows[0])[:5] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert rows == [rows[0]] and rows[0]["val_bpb"] == "0.995" and rows[0]["status"] == "pending"
    assert rows[0]["description"] == "baseline" and rows[0]["run_id"] == run_id
    entry = ledger(repo)[0]
    assert entry["config"] == summary["config"] and entry["verdict"] == "keep"


def test_the_store_is_its_owners_only_from_a_usual_shell(repo):
    """analyze.py run by hand (no night, whose umask is 077) from a shell whose umask is 022: the
    store, its ledger and the run's archive are still readable by their owner only."""
    fake_run(repo, 1.0)
    proc = subprocess.run([sys.executable, "analyze.py"], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}, umask=0o022)
    assert proc.returncode == 0, proc.stderr
    store = repo / ".auto-log-research"
    run = store / ledger(repo)[-1]["run_id"]
    modes = {p.relative_to(repo).as_posix(): p.stat().st_mode & 0o777
             for p in (store, store / "runs.jsonl", store / "results.tsv", run, run / "analysis.md")}
    assert modes == {".auto-log-research": 0o700, ".auto-log-research/runs.jsonl": 0o600,
                     ".auto-log-research/results.tsv": 0o600, f"{run.relative_to(repo)}": 0o700,
                     f"{run.relative_to(repo)}/analysis.md": 0o600}


def test_analysis_md_reports_compilation_and_stalls_on_the_clock(repo):
    compiled = {"backend": "inductor", "graphs": 9, "graph_breaks": 0, "recompiles": 8, "recompile_reasons": [],
                "graphs_in_loop": 0, "recompiles_in_loop": 0}
    fake_run(repo, 0.995, compile=compiled)
    assert analyze(repo).returncode == 0
    text = (repo / ".auto-log-research" / head(repo) / "analysis.md").read_text()
    assert "- compilation (inductor): 9 graphs, 0 graph breaks, 8 recompiles; none during the timed loop\n" in text
    commit_change(repo, "MATRIX_LR = 0.04", "MATRIX_LR = 0.05", "matrix lr 0.05")
    fake_run(repo, 0.99, seed=1, compile={**compiled, "graphs": 10, "graphs_in_loop": 1})
    assert analyze(repo).returncode == 0
    text = (repo / ".auto-log-research" / head(repo) / "analysis.md").read_text()
    assert "**1 graphs and 0 recompiles during the timed loop** (each one stalled the training clock" in text


def test_analysis_md_sections_in_order(repo):
    baseline(repo)
    commit_change(repo, "MATRIX_LR = 0.04", "MATRIX_LR = 0.05", "matrix lr 0.05")
    fake_run(repo, 0.97, seed=1, offset=(150, -0.1))
    assert analyze(repo).returncode == 0
    text = (repo / ".auto-log-research" / head(repo) / "analysis.md").read_text()
    sections = ["## Result", "## Verdict", "## Configuration vs best", "## Performance", "## Loss trajectory",
                "## Per-layer statistics", "## Plots", "## Agent Investigation Notes"]
    positions = [text.index(s) for s in sections]
    assert positions == sorted(positions)
    assert text.rstrip().endswith(
        "## Agent Investigation Notes\n\nThis file is the harness's: write your notes on this run in "
        f"`.auto-log-research/notes/{head(repo)}.md`.")
    assert "σ)" in text  # deltas in noise units
    assert "parted at step" in text  # the planted offset at step 150
    assert "power-law fit" in text and "tail (steps" in text
    patch = (repo / ".auto-log-research" / head(repo) / "diff.patch").read_text()
    assert "-MATRIX_LR = 0.04" in patch and "+MATRIX_LR = 0.05" in patch


def test_repeats_get_their_own_run_ids(repo):
    for seed in (1, 2, 3):
        fake_run(repo, 1.0 + seed / 1000, seed=seed)
        assert analyze(repo).returncode == 0
    c = head(repo)
    assert [r["run_id"] for r in ledger(repo)] == [c, f"{c}-2", f"{c}-3"]


def test_description_is_sanitised(repo):
    fake_run(repo)
    assert analyze(repo, "-m", "two\tcolumns\nand lines").returncode == 0
    row = Store(repo).read_results_tsv()[0]
    assert row["description"] == "two columns and lines" and row["status"] == "pending"


def test_analyzing_the_same_run_twice_is_refused(repo):
    fake_run(repo)
    assert analyze(repo).returncode == 0
    proc = analyze(repo)
    assert proc.returncode != 0 and "already archived" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert len(ledger(repo)) == 1


def test_no_run_is_refused(repo):
    proc = analyze(repo)
    assert proc.returncode != 0 and proc.stderr.startswith("error: no run to analyze")


# ---------------------------------------------------------------------------
# Crashes: never a number the run did not produce
# ---------------------------------------------------------------------------

def test_crash_without_summary_is_archived_with_traceback(repo):
    records = synthetic.make_records(n_steps=20)
    synthetic.write_run(repo, records, None, CRASH_LOG, truncate_metrics=True)
    proc = analyze(repo)
    assert proc.returncode == 0, proc.stderr
    assert "verdict: CRASH" in proc.stdout
    entry = ledger(repo)[0]
    assert entry["status"] == "crash" and entry["val_bpb"] is None
    assert entry["error"] == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    text = (repo / ".auto-log-research" / entry["run_id"] / "analysis.md").read_text()
    assert "## Crash" in text and "torch.OutOfMemoryError: CUDA out of memory" in text
    assert "nanobind" not in text.split("## Crash")[1].split("```")[1]
    assert "truncated" in text  # the half-written last metrics line is reported
    assert Store(repo).read_results_tsv()[0]["val_bpb"] == ""


def test_a_run_killed_from_outside_is_not_blamed_on_its_code(repo):
    log = ("step 00200 (60.0%) | loss: 4.1\nTraceback (most recent call last):\n  File \"train.py\", line 480, in <module>\n"
           "KeyboardInterrupt: terminated by SIGTERM after 130 s: killed from outside (a tool or supervisor timeout, "
           "or a stop), not by an error in train.py\n")
    synthetic.write_run(repo, synthetic.make_records(n_steps=20), None, log)
    proc = analyze(repo)
    assert proc.returncode == 0, proc.stderr
    assert "verdict: CRASH — KILLED from outside (a tool or supervisor timeout, or a stop)" in proc.stdout
    entry = ledger(repo)[0]
    assert entry["status"] == "crash" and entry["error"].startswith("KeyboardInterrupt: terminated by SIGTERM after 130 s")


def test_stale_summary_of_an_earlier_run_is_never_reported(repo):
    fake_run(repo, 0.9)
    assert analyze(repo).returncode == 0
    # the next run dies before train.py's logger starts (a syntax error): run.log is new, the rest is old
    (repo / "run.log").write_text('  File "train.py", line 3\n    def (\nSyntaxError: invalid syntax\n')
    proc = analyze(repo)
    assert proc.returncode == 0, proc.stderr
    latest = ledger(repo)[-1]
    assert latest["status"] == "crash" and latest["val_bpb"] is None
    assert "val_bpb: none" in proc.stdout and "SyntaxError: invalid syntax" in latest["error"]
    assert any("belongs to run" in n for n in latest["notes"])
    assert not (repo / ".auto-log-research" / latest["run_id"] / "run_summary.json").exists()


@pytest.mark.parametrize("status", ["nan", "timeout"])
def test_failed_statuses_are_kept_and_judged_crash(repo, status):
    fake_run(repo, status=status, error="loss nan at step 40", log="step 40\nFAIL: loss nan\n")
    assert analyze(repo).returncode == 0
    entry = ledger(repo)[0]
    assert entry["status"] == status and entry["verdict"] == "crash" and entry["val_bpb"] is None
    proc = analyze(repo, "keep")
    assert proc.returncode != 0 and f"status {status}" in proc.stderr


# ---------------------------------------------------------------------------
# Verdicts through the whole command
# ---------------------------------------------------------------------------

def test_seed_only_change_is_not_kept_and_a_real_gain_is(repo):
    baseline(repo)
    commit_change(repo, "# Model", "# Model (a comment: no effect on training)", "comment only")
    fake_run(repo, 0.9995, seed=7)
    proc = analyze(repo)
    assert "verdict: DISCARD" in proc.stdout and "too small to resolve" in proc.stdout  # p = 0.42: not worth a rerun
    assert ledger(repo)[-1]["status"] == "pending"
    assert analyze(repo, "discard").returncode == 0
    commit_change(repo, "MATRIX_LR = 0.04", "MATRIX_LR = 0.05", "matrix lr 0.05")
    fake_run(repo, 0.96, seed=8)
    proc = analyze(repo)
    assert "verdict: RERUN" in proc.stdout and "not yet confirmed" in proc.stdout, proc.stdout
    fake_run(repo, 0.961, seed=9)
    proc = analyze(repo)
    assert "verdict: KEEP" in proc.stdout, proc.stdout
    assert "σ" in proc.stdout


def test_rerun_pools_the_runs_of_the_same_code(repo):
    """A gain of about 0.0025 against a seed spread of about 0.002: each run of the candidate is pooled with the
    earlier ones and re-decided (rerun while p is below the policy's futility bound or not yet confirmed, keep
    once p < keep_alpha on confirm_runs runs). The p-values are computed here by hand (pooled σ, Student's t),
    not by analysis/verdict.py."""
    from scipy import stats as scipy_stats

    from analysis import verdict
    policy = verdict.POLICIES[verdict.VERDICT_MODE]
    base = [1.0, 1.002, 0.998]
    baseline(repo, base)
    commit_change(repo, "MATRIX_LR = 0.04", "MATRIX_LR = 0.045", "matrix lr 0.045")
    runs = [(1, 0.9975), (2, 0.9972), (3, 0.9978)]
    expected = []
    for k, (seed, value) in enumerate(runs, 1):
        fake_run(repo, value, seed=seed)
        assert analyze(repo).returncode == 0
        last = ledger(repo)[-1]
        candidate = [v for _, v in runs[:k]]
        groups = [base] + ([candidate] if k >= 2 else [])
        df = sum(len(g) - 1 for g in groups)
        sigma = math.sqrt(sum(sum((v - sum(g) / len(g)) ** 2 for v in g) for g in groups) / df)
        delta = sum(candidate) / k - sum(base) / 3
        p = scipy_stats.t.cdf(delta / (sigma * math.sqrt(1 / k + 1 / 3)), df)
        assert last["n_pooled"] == k
        assert last["p_value"] == pytest.approx(p, rel=1e-9)
        keep = p < policy["keep_alpha"] and (k >= policy["confirm_runs"] or p < policy["strong_alpha"])
        rerun = not keep and (p < policy["futility"][k - 1] or p < policy["keep_alpha"])
        expected.append("keep" if keep else "rerun" if rerun else "discard")
        assert last["verdict"] == expected[-1]
        assert last["status"] == ("rerun" if rerun else "pending")
        if not rerun:
            break
    assert expected == ["rerun", "rerun", "keep"]  # p = 0.196, 0.021, 0.0026 for these values


# ---------------------------------------------------------------------------
# keep / discard / compare / status
# ---------------------------------------------------------------------------

def test_keep_then_discard_gives_the_right_history_and_files(repo):
    baseline(repo)
    base_commit = head(repo)
    insights = (repo / ".auto-log-research" / "notes" / "insights.md").read_text()
    assert insights.startswith("# Insights") and "## Current Best" in insights
    assert f"`{base_commit}`" in insights and "mean of 3 run(s)" in insights and "1.000000" in insights
    assert {r["status"] for r in ledger(repo)} == {"keep"}

    commit_change(repo, "DEPTH = 8 ", "DEPTH = 12 ", "depth 12")
    bad_commit = head(repo)
    fake_run(repo, 1.05, seed=9)
    proc = analyze(repo)
    assert "verdict: DISCARD" in proc.stdout
    proc = analyze(repo, "discard")
    assert proc.returncode == 0, proc.stderr
    log = git(repo, "log", "--format=%s").splitlines()
    assert log[:3] == [f"revert to best {base_commit}", "depth 12", "baseline"]
    assert (repo / "train.py").read_text() == git(repo, "show", f"{base_commit}:train.py")
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""
    statuses = [r["status"] for r in Store(repo).read_results_tsv()]
    assert statuses == ["keep", "keep", "keep", "discard"]
    # the discarded change is still in the archive
    assert "+DEPTH = 12" in (repo / ".auto-log-research" / bad_commit / "diff.patch").read_text()
    # the user's own notes in insights.md survive a new keep
    path = repo / ".auto-log-research" / "notes" / "insights.md"
    path.write_text(path.read_text() + "\n- wider is better at this budget (runs a, b)\n")
    commit_change(repo, "MATRIX_LR = 0.04", "MATRIX_LR = 0.05", "matrix lr 0.05")
    fake_run(repo, 0.95, seed=10)
    analyze(repo)
    assert analyze(repo, "keep").returncode == 0
    text = path.read_text()
    assert text.count("## Current Best") == 1 and f"`{head(repo)}`" in text and "0.950000" in text
    assert "wider is better at this budget" in text


@pytest.mark.parametrize("failure", ["no summary (SyntaxError)", "crash before the device is known", "invalid"])
def test_discard_reverts_to_the_best_after_every_kind_of_failure(repo, failure):
    """Where a failed run recorded no device (or another harness), its own pool has no best; discard must
    still revert to the store's best, as program.md tells the agent to do."""
    baseline(repo)
    base_commit = head(repo)
    commit_change(repo, "DEPTH = 8 ", "DEPTH = 12 ", "depth 12")
    if failure == "no summary (SyntaxError)":
        (repo / "run_summary.json").unlink(missing_ok=True)
        (repo / "metrics.jsonl").write_text("")
        (repo / "run.log").write_text('  File "train.py", line 3\n    def (\nSyntaxError: invalid syntax\n')
    elif failure == "crash before the device is known":
        records = synthetic.make_records(n_steps=0)
        summary = synthetic.make_summary(records, None, commit=head(repo), train_sha256=train_sha(repo), status="crash",
                                         device=None, error="RuntimeError: CUDA error: out of memory")
        synthetic.write_run(repo, records, summary, "RuntimeError: CUDA error: out of memory\n")
    else:
        fake_run(repo, 0.5, seed=5, harness_hash="f" * 16)  # not the harness's hash: invalid, and in no kept pool
    proc = analyze(repo)
    assert proc.returncode == 0, proc.stderr
    assert ledger(repo)[-1]["status"] in ("crash", "invalid")
    proc = analyze(repo, "discard")
    assert proc.returncode == 0, proc.stderr
    assert f"train.py restored to best {base_commit}" in proc.stdout
    assert git(repo, "log", "-1", "--format=%s").strip() == f"revert to best {base_commit}"
    assert (repo / "train.py").read_text() == git(repo, "show", f"{base_commit}:train.py")


def test_a_run_on_other_hardware_is_never_a_silent_new_baseline(repo):
    baseline(repo)
    base_commit = head(repo)
    commit_change(repo, "DEPTH = 8 ", "DEPTH = 4 ", "depth 4")
    fake_run(repo, 0.5, seed=7, device="cpu")  # far "better", but measured elsewhere
    proc = analyze(repo)
    assert proc.returncode == 0, proc.stderr
    assert "verdict: DISCARD — NEW POOL: not comparable with the kept runs (device 'NVIDIA H100 80GB HBM3' -> 'cpu')" \
        in proc.stdout
    entry = ledger(repo)[-1]
    proc = analyze(repo, "keep")
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"error: run {entry['run_id']} is comparable with no kept run "
                                  f"(device 'NVIDIA H100 80GB HBM3' -> 'cpu'): keeping it would start a new baseline")
    assert f"best: {base_commit}" in analyze(repo, "status").stdout
    proc = analyze(repo, "keep", "--new-baseline")
    assert proc.returncode == 0, proc.stderr
    assert ledger(repo)[-1]["status"] == "keep"
    assert f"`{entry['commit']}`" in (repo / ".auto-log-research" / "notes" / "insights.md").read_text()  # the new Current Best


def test_keep_and_discard_refuse_unsafe_situations(repo):
    proc = analyze(repo, "keep")
    assert proc.returncode != 0 and "no run to act on" in proc.stderr
    fake_run(repo)
    analyze(repo)
    proc = analyze(repo, "discard")
    assert proc.returncode != 0 and "no best yet" in proc.stderr
    proc = analyze(repo, "keep", "deadbee")
    assert proc.returncode != 0 and "unknown run id 'deadbee'" in proc.stderr
    (repo / "prepare.py").write_text((repo / "prepare.py").read_text() + "\n# edited\n")
    proc = analyze(repo, "keep")
    assert proc.returncode != 0 and "uncommitted changes other than train.py (prepare.py)" in proc.stderr
    for p in (proc,):
        assert len(p.stderr.strip().splitlines()) == 1
    assert ledger(repo)[0]["status"] == "pending"


def test_keep_refuses_a_run_of_uncommitted_code(repo):
    (repo / "train.py").write_text((repo / "train.py").read_text().replace("DEPTH = 8 ", "DEPTH = 9 "))
    fake_run(repo, dirty=True)
    analyze(repo)
    proc = analyze(repo, "keep")
    assert proc.returncode != 0 and "did not run a committed train.py" in proc.stderr


def test_compare_and_status(repo):
    baseline(repo)
    a = ledger(repo)[0]["run_id"]
    commit_change(repo, "MATRIX_LR = 0.04", "MATRIX_LR = 0.05", "matrix lr 0.05")
    fake_run(repo, 0.97, seed=3, offset=(100, -0.1))
    analyze(repo)
    b = head(repo)
    proc = analyze(repo, "compare", b, a)
    assert proc.returncode == 0, proc.stderr
    assert "- `SEED`: 42 → 3" in proc.stdout  # the config diff (only the seed differs) ...
    assert "parted at step" in proc.stdout and "lower" in proc.stdout  # ... but not a loss curve
    assert (repo / ".auto-log-research" / "compare" / f"{b}_vs_{a}.png").exists()
    assert analyze(repo, "compare", b, "nope").returncode != 0
    proc = analyze(repo, "status")
    assert proc.returncode == 0
    assert f"best: {a}" in proc.stdout and "3 keep" in proc.stdout and "1 rerun" in proc.stdout  # to be confirmed
    assert "noise: σ =" in proc.stdout
    assert "seed pairing: no estimate yet" in proc.stdout  # the idea ran once under the best's seeds


def test_status_shows_how_much_noise_runs_under_the_same_seed_share(repo):
    baseline(repo)  # seeds 42, 43, 44: 1.0, 1.002, 0.998
    commit_change(repo, "MATRIX_LR = 0.04", "MATRIX_LR = 0.05", "matrix lr 0.05")
    for seed, value in ((42, 0.995), (43, 0.9965)):
        fake_run(repo, value, seed=seed)
        assert analyze(repo).returncode == 0
    # paired differences -0.005, -0.0055: 1 df, variance 1.25e-7; σ² pooled over both codes:
    # (8e-6 + 1.125e-6) / 3; raw = 1 - 1.25e-7 / (2 σ²) = 0.979, shrunk by 1 / (1 + 8) to 0.109
    assert ("seed pairing: ρ = 0.11 of the noise shared by runs under the same SEED (raw 0.98 "
            "from 1 paired df over 1 idea(s), shrunk toward 0 while few)") in analyze(repo, "status").stdout
    rows = ledger(repo)
    text = (repo / ".auto-log-research" / rows[-1]["run_id"] / "analysis.md").read_text()
    assert f"vs the best's run under the same SEED 43 ({rows[1]['run_id']}, 1.002000): -0.005500" in text


def test_a_row_records_the_agent_of_its_session_and_status_names_it(repo, monkeypatch):
    """AUTORESEARCH_AGENT (set by the night for the agent's and the harness's commands) is recorded in
    the row analyze.py writes; keep, given without it, leaves it; status names it, and rows made by
    hand (none recorded) print no agent and no "None"."""
    monkeypatch.delenv("AUTORESEARCH_AGENT", raising=False)
    baseline(repo)  # by hand: three rows without an agent
    commit_change(repo, "MATRIX_LR = 0.04", "MATRIX_LR = 0.05", "matrix lr 0.05")
    fake_run(repo, 0.95, seed=42)
    monkeypatch.setenv("AUTORESEARCH_AGENT", "codex gpt-test")
    assert analyze(repo).returncode == 0
    monkeypatch.delenv("AUTORESEARCH_AGENT")
    assert analyze(repo, "keep").returncode == 0
    rows = ledger(repo)
    assert [r.get("agent") for r in rows] == [None, None, None, "codex gpt-test"]
    assert rows[-1]["status"] == "keep"  # keep changed its status, not who made it
    out = analyze(repo, "status").stdout.splitlines()
    assert "agent: codex gpt-test (1 of the latest night's 4 run(s))" in out
    listed = out[out.index("latest 4:") + 1:]
    assert [line.endswith("  [codex gpt-test]") for line in listed] == [False] * 3 + [True], listed
    assert not any("None" in line or "[" in line for line in listed[:3]), listed


def test_status_names_the_agents_of_the_latest_night_only():
    night = lambda name, agent, n: [{"run_id": f"{name}{i}", "status": "discard", "night": name,  # noqa: E731
                                     "agent": agent} for i in range(n)]
    two = night("A", "codex gpt-test", 2) + night("B", "claude claude-opus-4-1", 2) + \
        night("B", "api claude-sonnet-4-5", 1) + night("B", None, 1)
    assert report.agent_line(two) == ["agents: claude claude-opus-4-1 (2), api claude-sonnet-4-5 (1) of "
                                      "the latest night's 4 run(s)"]
    assert report.agent_line(night("A", "codex gpt-test", 2) + night("B", None, 3)) == []
    assert report.agent_line([]) == []


# ---------------------------------------------------------------------------
# Concurrency and interruption
# ---------------------------------------------------------------------------

def test_concurrent_analyze_processes_never_lose_a_row(repo):
    procs = []
    for i in range(5):
        run_dir = repo / f"run{i}"
        run_dir.mkdir()
        records = synthetic.make_records(n_steps=100, seed=i)
        synthetic.write_run(run_dir, records, synthetic.make_summary(records, 1.0 + i / 100, commit=head(repo),
                                                                     train_sha256=train_sha(repo), seed=i,
                                                                     started_at=f"2026-11-22T10:00:0{i}+0000"),
                            f"run {i}\n")
        procs.append(subprocess.Popen([sys.executable, "analyze.py", "--run-dir", str(run_dir)], cwd=repo,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, **GIT_ENV}))
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    rows = Store(repo).read_results_tsv()
    assert sorted(float(r["val_bpb"]) for r in rows) == [1.0, 1.01, 1.02, 1.03, 1.04]
    assert len({r["run_id"] for r in rows}) == 5
    assert len(ledger(repo)) == 5


LEDGER_WRITER = """
import itertools, json, sys
sys.path.insert(0, sys.argv[1])
from analysis.store import Store
store, ledgers = Store(sys.argv[1]), json.loads(open(sys.argv[2]).read())
with store.lock():  # as analyze.py writes: the lock is the OS's, released when the process dies
    for n in itertools.count(1):
        print(f"writing {n}", flush=True)
        store.write_ledger(ledgers[n % 2])
"""
REPETITIONS = 8
WRITE_DEADLINE_S = 120  # a safety net only: each wait ends on an event (a line, a change of a file)


def store_files(store) -> dict:
    """What can be seen of the store's files from outside: name -> (inode, size, mtime)."""
    out = {}
    for path in store.dir.iterdir():
        try:
            st = path.stat()
        except FileNotFoundError:  # renamed away between iterdir and stat
            continue
        out[path.name] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def test_an_interrupted_write_leaves_the_ledger_intact(repo, tmp_path):
    """A process that writes large ledgers through Store.write_ledger is SIGKILLed mid-write, at a
    different point each time: after the n-th change to the store's files that it was seen making (a
    file created, grown, renamed), whatever the implementation does. runs.jsonl and results.tsv are each
    always whole (the old content or a new one, never a mix), and the next analyze.py works."""
    import signal
    import time
    fake_run(repo)
    assert analyze(repo).returncode == 0
    store = Store(repo)
    original = store.read_ledger()
    row = original[0]
    ledgers = [original + [{**row, "run_id": f"{name}-{i}", "description": f"copy {i} of ledger {name}"}
                           for i in range(size)] for name, size in (("a", 1500), ("b", 2000))]
    (tmp_path / "ledgers.json").write_text(json.dumps(ledgers))
    contents = {json.dumps(ledger_, sort_keys=True) for ledger_ in [original] + ledgers}
    run_ids = [[r["run_id"] for r in ledger_] for ledger_ in [original] + ledgers]

    for rep in range(REPETITIONS):
        changes_before_kill = rep  # 0: as soon as the writer reports that it started writing
        writer = subprocess.Popen([sys.executable, "-c", LEDGER_WRITER, str(repo), str(tmp_path / "ledgers.json")],
                                  stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + WRITE_DEADLINE_S
        seen = store_files(store)
        assert writer.stdout.readline() == "writing 1\n"
        changes = 0
        while changes < changes_before_kill:
            now = store_files(store)
            if now != seen:
                changes, seen = changes + 1, now
            assert writer.poll() is None and time.monotonic() < deadline, f"{changes} changes seen"
            time.sleep(0.0001)  # leaves the CPU to the writer; the wait itself is on the changes
        writer.send_signal(signal.SIGKILL)
        assert writer.wait(timeout=WRITE_DEADLINE_S) == -signal.SIGKILL

        assert json.dumps(store.read_ledger(), sort_keys=True) in contents, f"repetition {rep}: runs.jsonl is a mix"
        assert [r["run_id"] for r in store.read_results_tsv()] in run_ids, f"repetition {rep}: results.tsv is a mix"

    # the next analyze takes the lock the killed writer held, and appends to whichever ledger is there
    last = store.read_ledger()
    fake_run(repo, 0.99, seed=7)
    proc = analyze(repo)
    assert proc.returncode == 0, proc.stderr
    after = store.read_ledger()
    assert after[:-1] == last and after[-1]["val_bpb"] == 0.99
    assert [r["run_id"] for r in store.read_results_tsv()] == [r["run_id"] for r in after]


# ---------------------------------------------------------------------------
# Plots: the data drawn, not only the files
# ---------------------------------------------------------------------------

def test_run_figures_plot_this_best_and_previous_series():
    this, best, prev = (synthetic.make_records(n_steps=120, seed=s) for s in (1, 2, 3))
    figures = plots.run_figures([("this", this), ("best", best), ("previous", prev)])
    assert set(figures) == {p.file for p in plots.PLOTS} | {plots.LAYER_HEATMAP}
    for plot in plots.PLOTS:
        fig = figures[plot.file]
        for ax, panel in zip(fig.axes, plot.panels):
            lines = {line.get_label(): line for line in ax.get_lines()}
            for label, records in (("this", this), ("best", best), ("previous", prev)):
                x, y = stats.series(records, panel.key, plot.x)
                assert np.allclose(lines[label].get_xdata(), x) and np.allclose(lines[label].get_ydata(), y), \
                    (plot.file, panel.key, label)
    val = {line.get_label(): line for line in figures["val_bpb.png"].axes[0].get_lines()}
    assert len(val["this"].get_xdata()) == sum(contract.VAL_BPB in r for r in this)
    raw = {line.get_label(): line for line in figures["loss_vs_step.png"].axes[0].get_lines()}["this (raw)"]
    assert np.allclose(raw.get_ydata(), [r[contract.TRAIN_LOSS] for r in this])


def test_layer_heatmap_shows_log_grad_norms_of_each_run():
    this, best = synthetic.make_records(n_steps=101, seed=1), synthetic.make_records(n_steps=101, seed=2)
    fig = plots.layer_heatmap([("this", this), ("best", best)])
    images = [ax.get_images()[0] for ax in fig.axes if ax.get_images()]
    assert len(images) == 2
    table = stats.layer_table(this)
    names = sorted(table)
    expected = np.log10([table[n]["grad_norm"][1] for n in names])
    assert np.allclose(images[0].get_array(), expected)


def test_progress_plot_highlights_kept_runs_and_running_best():
    values = [1.0, 1.01, None, 0.99, 0.995, 0.98]
    statuses = ["keep", "discard", "crash", "keep", "discard", "keep"]
    led = [{"run_id": f"r{i}", "val_bpb": v, "status": s, "description": f"idea {i}"}
           for i, (v, s) in enumerate(zip(values, statuses))]
    fig = plots.progress_figure(led)
    ax = fig.axes[0]
    scatters = {c.get_label(): c.get_offsets() for c in ax.collections}
    assert np.allclose(scatters["kept"], [[1, 1.0], [4, 0.99], [6, 0.98]])
    assert np.allclose(scatters["crash / nan / timeout"][:, 0], [3])
    best = {line.get_label(): line for line in ax.get_lines()}["running best"]
    assert np.allclose(best.get_ydata(), [1.0, 1.0, 1.0, 0.99, 0.99, 0.98])
    assert [t.get_text() for t in ax.texts if t.get_text().startswith("idea")] == ["idea 0", "idea 3", "idea 5"]


def test_metrics_reader_keeps_complete_lines_of_a_truncated_file(tmp_path):
    records = synthetic.make_records(n_steps=10)
    synthetic.write_run(tmp_path, records, truncate_metrics=True)
    got, problems = read_metrics(tmp_path / "metrics.jsonl")
    assert got == json.loads(json.dumps(records[:-1]))
    assert problems == ["line 10 of metrics.jsonl is truncated"]


# ---------------------------------------------------------------------------
# A real tiny CPU train.py run, end to end
# ---------------------------------------------------------------------------

def test_real_cpu_run_end_to_end(prepared, repo):
    env = {**os.environ, **GIT_ENV, "AUTORESEARCH_TIME_BUDGET": "4"}
    train = subprocess.run([sys.executable, "launch.py"], cwd=repo, capture_output=True, env=env, timeout=300)
    assert train.returncode == 0, (repo / "run.log").read_text()[-2000:]
    summary = json.loads((repo / "run_summary.json").read_text())
    proc = analyze(repo)
    assert proc.returncode == 0, proc.stderr
    assert f"val_bpb: {summary['val_bpb']:.6f}" in proc.stdout and "verdict: KEEP" in proc.stdout
    entry = ledger(repo)[0]
    assert entry["status"] == "pending" and entry["device"] == "cpu" and entry["train_sha256"] == train_sha(repo)
    folder = repo / ".auto-log-research" / entry["run_id"]
    text = (folder / "analysis.md").read_text()
    assert "SMOKE-TEST" in text and "## Per-layer statistics" in text and "parameter matrices measured" in text
    assert "Validation curve" in text and "gap (val − train)" in text
    for plot in plots.PLOTS:
        assert (folder / plot.file).stat().st_size > 1000
    assert analyze(repo, "keep").returncode == 0
    assert "## Current Best" in (repo / ".auto-log-research" / "notes" / "insights.md").read_text()


def test_analyze_imports_no_torch(repo):
    fake_run(repo)
    code = ("import sys, analyze; rc = analyze.main([]); "
            "assert rc == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_verdict_pairs_an_idea_with_the_bests_runs_of_the_same_seeds_and_shapes(repo):
    baseline(repo)                                    # seeds 42, 43, 44: 1.0, 1.002, 0.998
    commit_change(repo, "MATRIX_LR = 0.04", "MATRIX_LR = 0.05", "matrix lr 0.05")
    for seed, value in ((42, 0.999), (43, 1.001)):    # 0.001 below the best's run of each seed
        fake_run(repo, value, seed=seed)
        assert analyze(repo).returncode == 0
    analysis = (repo / ".auto-log-research" / ledger(repo)[-1]["run_id"] / "analysis.md").read_text()
    # σ = sqrt((8e-6 + 2e-6) / 3); the paired differences agree exactly: raw ρ 1, shrunk by 1 / (1 + 8);
    # se = σ sqrt(1/2 + 1/3 - 2 (1/9) 2 / 6)
    assert ("| standard error of the difference | 0.001591 (paired: 2 SEED(s) shared with the best, which "
            "share ρ = 0.11 of the noise) |") in analysis, analysis
    assert "seed pairing: ρ = 0.11 of the noise shared by runs under the same SEED" in analyze(repo, "status").stdout
    commit_change(repo, "MATRIX_LR = 0.05", "MATRIX_LR = 0.06", "a wider model")
    fake_run(repo, 0.999, seed=42, num_params_M=75.0)  # other shapes: its seed draws other weights
    assert analyze(repo).returncode == 0
    analysis = (repo / ".auto-log-research" / ledger(repo)[-1]["run_id"] / "analysis.md").read_text()
    assert ("| standard error of the difference | 0.002108 (unpaired: no SEED shared with a best of the same "
            "shapes) |") in analysis, analysis
