"""supervise.py, the overnight loop: stop rules, the claude backend against a stand-in executable, the api
backend against a local server speaking the Messages API that drives the real loop (edit, train,
analyze, keep / discard, revert), Ctrl-C in the middle of a run, and program.md's commands."""

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import proc as processes
from night import rules, sessions, supervisor
from analysis.store import Store
from conftest import ROOT
from fake_api import StreamingMessagesAPI, error
from repos import GIT_ENV, HARNESS, analyze, fake_run, git, make_repo

SECRET = "sk-ant-test-DO-NOT-WRITE-4f9c2e"
PY = shlex.quote(sys.executable)


@pytest.fixture
def repo(tmp_path):
    return make_repo(tmp_path / "repo", HARNESS + ("supervise.py", "program.md"))


def supervise_proc(repo, *args, env=None):
    return subprocess.Popen([sys.executable, "supervise.py", *args], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **GIT_ENV, **(env or {})})


# ---------------------------------------------------------------------------
# Stop rules
# ---------------------------------------------------------------------------

def rows(*statuses):
    return [{"status": s, "analyzed_at": "2026-11-22T01:00:00+0000", "error": "boom"} for s in statuses]


def test_stop_rules():
    stop_rules = rules.StopRules(max_consecutive_crashes=3, max_without_keep=4, max_experiments=10)
    now = time.time()
    assert rules.stop_reason(rows("keep", "crash", "crash"), stop_rules, now, now) is None
    assert "3 crashes in a row" in rules.stop_reason(rows("keep", "crash", "nan", "timeout"), stop_rules, now, now)
    assert "no keep in the last 4" in rules.stop_reason(rows("keep", "discard", "crash", "discard", "rerun"),
                                                            stop_rules, now, now)
    assert "budget" in rules.stop_reason(rows(*["keep"] * 10), stop_rules, now, now)
    assert "deadline" in rules.stop_reason([], rules.StopRules(deadline=now - 1), now, now)
    hours = rules.StopRules(max_hours_without_keep=1.0)
    assert rules.stop_reason(rows("discard"), hours, now, now - 1800) is None
    assert "no keep for 2.0 hours" in rules.stop_reason(rows("discard"), hours, now, now - 7200)
    recent_keep = [{"status": "keep", "analyzed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now - 600))}]
    assert rules.stop_reason(recent_keep + rows("discard"), hours, now, now - 7200) is None


def test_the_report_follows_the_ledger_and_a_failure_is_one_status_line(repo):
    args = argparse.Namespace(backend="api", hours=None, max_experiments=None, max_crashes=3, max_without_keep=None,
                              max_hours_without_keep=None, pass_env=set())
    fake_run(repo, 1.0)
    assert analyze(repo).returncode == 0
    sup = supervisor.Supervisor(args, repo)
    report = repo / ".auto-log-research" / "report.html"
    sup.refresh_report(wait=True)
    assert report.read_text().count('<tr class="run"') == 1
    written = report.stat().st_mtime_ns
    sup.refresh_report(wait=True)  # the ledger did not change: nothing is rewritten
    assert sup.report_proc is None and report.stat().st_mtime_ns == written
    (repo / "analysis" / "templates" / "report.html.j2").write_text("{% if %}")
    fake_run(repo, 0.99, seed=2)
    assert analyze(repo).returncode == 0
    sup._ledger()
    sup.refresh_report(wait=True)
    last = (repo / ".auto-log-research" / "status.log").read_text().strip().splitlines()[-1]
    assert last.split(" | ")[1].startswith("report not written: error: the report template ")
    assert "restore it with `git checkout analysis/templates`" in last and report.stat().st_mtime_ns == written


# ---------------------------------------------------------------------------
# Backend claude, with a stand-in executable
# ---------------------------------------------------------------------------

STAND_IN = """#!/bin/sh
n=$(cat "$CALLS/n" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$CALLS/n"
cat > "$CALLS/stdin.$n"
echo "stand-in claude called with: $*"
sleep "${SLEEP:-0}"
exit 3
"""


@pytest.fixture
def stand_in(tmp_path):
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    (bin_dir / "claude").write_text(STAND_IN)
    (bin_dir / "claude").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(calls), "IS_SANDBOX": "1"}, calls


# the agent sees only the allowlist and the names passed; unboxed, as the stand-in and its records live
# outside the repository (the box: test_sandbox.py)
STAND_IN_ENV = ("--pass-env", "CALLS,SLEEP", "--no-sandbox")


def test_claude_backend_restarts_with_a_resume_prompt_until_a_stop_rule(repo, stand_in):
    env, calls = stand_in
    proc = supervise_proc(repo, "--backend", "claude", "--restart-delay", "0", *STAND_IN_ENV, env=env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out  # a night that never got going failed
    n = int((calls / "n").read_text())
    assert n == sessions.MAX_QUICK_EXITS
    assert (calls / "stdin.1").read_text() == (repo / "program.md").read_text()
    resume = (calls / "stdin.2").read_text()
    assert resume == sessions.RESUME_PROMPT
    for name in ("insights.md", "ideas_queue.md", "results.tsv", "program.md"):
        assert name in resume
    store = repo / ".auto-log-research"
    assert ("stand-in claude called with: -p --dangerously-skip-permissions --output-format stream-json --verbose"
            in (store / "supervisor.log").read_text())
    last = (store / "status.log").read_text().strip().splitlines()[-1]
    assert f"claude exited {n} times in a row" in last and "stopped" in last


def test_claude_backend_is_stopped_at_the_deadline(repo, stand_in):
    env, calls = stand_in
    t0 = time.time()
    proc = supervise_proc(repo, "--backend", "claude", "--hours", str(3 / 3600), *STAND_IN_ENV,
                          env={**env, "SLEEP": "60"})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert time.time() - t0 < 40  # the 60 s session was terminated, not waited for
    assert int((calls / "n").read_text()) == 1
    assert "deadline reached" in (repo / ".auto-log-research" / "status.log").read_text()


# ---------------------------------------------------------------------------
# Backend api, against a local Messages API server with scripted tool-use turns
# ---------------------------------------------------------------------------

def rate_limited_once(script):
    """The Messages API answers the agent's first request 429 (proving the retry), then the scripted turns."""
    return StreamingMessagesAPI([error(429, "rate_limit_error", "slow")] + script, agent_tool="bash")


def bash(command):
    return {"type": "tool_use", "name": "bash", "input": {"command": command, "timeout_s": 300}}


def done(text="experiment done"):
    return [{"type": "text", "text": text}]


TRAIN_ANALYZE = f"{PY} launch.py; {PY} analyze.py"


def three_experiments():
    return [
        # 1: the baseline, kept; the agent writes its ideas queue (and looks for the key, in vain)
        [bash("env | grep -c ANTHROPIC_API_KEY; tr '\\0' '\\n' < /proc/$PPID/environ | grep -c ANTHROPIC_API_KEY")],
        [bash(f"{TRAIN_ANALYZE} && {PY} analyze.py keep")],
        [{"type": "tool_use", "name": "write_file",
          "input": {"path": ".auto-log-research/notes/ideas_queue.md", "content": "# Ideas queue\n1. higher matrix lr\n"}}],
        done("baseline kept"),
        # 2: a change, committed, trained, discarded (reverted to the best)
        [{"type": "text", "text": "trying a higher Muon lr"},
         {"type": "tool_use", "name": "edit_file",
          "input": {"path": "train.py", "old": "MATRIX_LR = 0.04", "new": "MATRIX_LR = 0.4"}}],
        [bash('git commit -qam "matrix lr 0.4: faster progress in 5 minutes?"')],
        [bash(f"{TRAIN_ANALYZE} && {PY} analyze.py discard")],
        done("discarded"),
        # 3: a change that crashes, discarded
        [{"type": "tool_use", "name": "edit_file",
          "input": {"path": "train.py", "old": "run.start_clock(model, TOTAL_BATCH_SIZE, flops_per_token)",
                    "new": "raise RuntimeError('planted bug')"}}],
        [bash('git commit -qam "a planted bug"')],
        [bash(f"{TRAIN_ANALYZE}; {PY} analyze.py discard")],
        done("crashed, discarded"),
    ]


def test_api_backend_drives_three_iterations_of_the_real_loop(prepared, repo):
    api = rate_limited_once(three_experiments())
    try:
        proc = supervise_proc(repo, "--backend", "api", "--max-experiments", "3", "--model", "test-model",
                              env={"ANTHROPIC_API_KEY": SECRET, "ANTHROPIC_BASE_URL": api.url,
                                   "AUTORESEARCH_TIME_BUDGET": "3"})
        out, _ = proc.communicate(timeout=600)
    finally:
        api.close()
    assert proc.returncode == 0, out + (repo / ".auto-log-research" / "supervisor.log").read_text()[-3000:]
    # git: the baseline, two experiments, each reverted to the best
    subjects = git(repo, "log", "--format=%s").splitlines()
    base = git(repo, "log", "--format=%h", "-1", "HEAD~4").strip()
    assert subjects == [f"revert to best {base}", "a planted bug", f"revert to best {base}",
                        "matrix lr 0.4: faster progress in 5 minutes?", "baseline"]
    assert (repo / "train.py").read_text() == (ROOT / "train.py").read_text()
    # the ledger, the archives and insights.md
    store = Store(repo)
    rows = store.read_results_tsv()
    assert [r["status"] for r in rows] == ["keep", "discard", "crash"]
    assert rows[1]["description"] == "matrix lr 0.4: faster progress in 5 minutes?"
    for r in rows:
        assert (store.run_path(r["run_id"]) / "analysis.md").exists()
    assert "MATRIX_LR = 0.4" in (store.run_path(rows[1]["run_id"]) / "diff.patch").read_text()
    assert f"`{base}`" in store.path("notes/insights.md").read_text()
    assert store.path("notes/ideas_queue.md").read_text().startswith("# Ideas queue")
    # the morning report, rewritten as the ledger changed and once more for the settled night
    report = store.path("report.html").read_text()
    assert report.count('<tr class="run"') == 3
    assert [m for m in re.findall(r'data-status="(\w+)"', report)] == ["keep", "discard", "crash"]
    assert "report not written" not in (repo / ".auto-log-research" / "status.log").read_text()
    assert "morning report: .auto-log-research/report.html" in (repo / ".auto-log-research" / "status.log").read_text()
    # every experiment started from a fresh, compact context
    assert api.failures_sent == 1  # the 429, retried
    firsts = [r for r in api.agent_requests if len(r["messages"]) == 1]
    assert len(firsts) == 3
    assert "none yet" in firsts[0]["messages"][0]["content"]
    assert "## Current Best" in firsts[1]["messages"][0]["content"]
    assert all(len(r["messages"]) <= 7 for r in api.agent_requests)
    assert all(r["system"] == (repo / "program.md").read_text() for r in api.agent_requests)
    # the key: sent to the API, hidden from commands, written nowhere
    assert api.keys == {SECRET}
    log = (repo / ".auto-log-research" / "supervisor.log").read_text()
    assert "exit code 1\n0\n0" in log  # neither the command's environment nor the supervisor's /proc environ has it
    for path in repo.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert "experiment budget used (3 runs)" in (repo / ".auto-log-research" / "status.log").read_text()


def test_ctrl_c_in_the_middle_of_a_run_leaves_no_corrupt_file(prepared, repo):
    api = rate_limited_once([[bash(f"{TRAIN_ANALYZE}")], done()])
    try:
        proc = supervise_proc(repo, "--backend", "api", env={"ANTHROPIC_API_KEY": SECRET,
                                                            "ANTHROPIC_BASE_URL": api.url,
                                                            "AUTORESEARCH_TIME_BUDGET": "120"})
        metrics = repo / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.5)
        assert metrics.exists(), "training never started"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        api.close()
    assert proc.returncode == 130, out
    assert processes.scripts_in(repo, "train.py") == []
    summary = json.loads((repo / "run_summary.json").read_text())  # written whole, by the SIGTERM handler
    assert summary["status"] == "crash"
    for line in metrics.read_text().splitlines():
        json.loads(line)
    assert not (repo / ".git" / "index.lock").exists()
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""
    assert "stopped by Ctrl-C" in (repo / ".auto-log-research" / "status.log").read_text().splitlines()[-1]
    # the experiment is settled like any other stop: the cut run is in the ledger, train.py is the best's again
    rows = Store(repo).read_ledger()
    assert rows[-1]["status"] == "crash" and rows[-1]["started_at"] == summary["started_at"], rows[-1]
    # ... as the night's, with the agent and model of its session
    assert rows[-1]["night"] and rows[-1]["agent"] == "api claude-sonnet-4-5"
    assert "archived the run the stop interrupted: analyze.py done" in (
        repo / ".auto-log-research" / "status.log").read_text()


def test_api_backend_needs_a_key(repo):
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    proc = subprocess.run([sys.executable, "supervise.py", "--backend", "api"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "ANTHROPIC_API_KEY" in proc.stderr


# ---------------------------------------------------------------------------
# program.md: every command and file it names is real
# ---------------------------------------------------------------------------

def program_commands() -> list:
    text = (ROOT / "program.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    inline = re.findall(r"`((?:uv run|git|SEED=|mkdir)[^`]*)`", text)
    commands = [line.strip() for b in blocks for line in b.splitlines() if line.strip()] + inline
    return [part.strip() for c in commands for part in c.split("&&")]


def test_program_md_commands_exist_and_run(repo):
    commands = program_commands()
    assert any("analyze.py keep" in c for c in commands) and any("analyze.py discard" in c for c in commands)
    checked = set()
    for command in commands:
        words = shlex.split(command)
        words = words[:next((i for i, w in enumerate(words) if w.startswith(">") or w == "2>&1"), len(words))]
        words = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)]  # SEED=1 ...
        if words[:2] == ["uv", "run"]:
            target = words[2]
            if target.endswith(".py"):
                assert (ROOT / target).exists(), command
                if target == "analyze.py" and len(words) > 3:
                    sub = words[3]
                    if (target, sub) not in checked:  # every subcommand parses
                        checked.add((target, sub))
                        proc = subprocess.run([sys.executable, target, sub, "--help"], cwd=repo,
                                              capture_output=True, text=True, timeout=60)
                        assert proc.returncode == 0, (command, proc.stderr)
            else:
                assert target == "python", command
        elif words[0] == "git":
            assert words[1] in ("checkout", "commit", "status", "log"), command
        else:
            assert words[0] == "mkdir", command
    # the status command runs in a fresh repository
    proc = subprocess.run([sys.executable, "analyze.py", "status"], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0
    for name in ("train.py", "harness/metric.py", "prepare.py", "launch.py", "analyze.py", "harness/",
                 "analysis/", "pyproject.toml", "README.md"):
        assert name in (ROOT / "program.md").read_text() and Path(ROOT / name.rstrip("/")).exists(), name


def run_api_night(repo, script, *args, timeout=300):
    api = StreamingMessagesAPI(script, agent_tool="bash")
    try:
        proc = supervise_proc(repo, "--backend", "api", "--model", "test-model", *args,
                              env={"ANTHROPIC_API_KEY": SECRET, "ANTHROPIC_BASE_URL": api.url,
                                   "AUTORESEARCH_TIME_BUDGET": "3"})
        out, _ = proc.communicate(timeout=timeout)
    finally:
        api.close()
    return proc, out, api


@pytest.mark.parametrize("status, kind, said", [
    (401, "authentication_error", "the API refused the key or the model (401): invalid x-api-key"),
    (404, "not_found_error", "the API refused the key or the model (404): invalid x-api-key"),
])
def test_api_errors_no_retry_can_fix_end_the_night_with_the_apis_message(repo, status, kind, said):
    proc, out, api = run_api_night(repo, [error(status, kind, "invalid x-api-key")])
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    last = (repo / ".auto-log-research" / "status.log").read_text().strip().splitlines()[-1]
    assert f"stopped: {said}" in last
    assert api.failures_sent == 1  # not retried


def test_a_context_that_grew_too_long_is_trimmed_and_the_experiment_goes_on(repo):
    long_output = bash(f"{PY} -c \"print('x' * 20000)\"")
    script = [[long_output], [bash("echo second")], error(400, "invalid_request_error", "prompt is too long: 250000 tokens"),
              done("finished after trimming")]
    proc, out, api = run_api_night(repo, script, "--hours", str(20 / 3600))
    log = (repo / ".auto-log-research" / "supervisor.log").read_text()
    assert "context too long" in log and "trimmed the oldest tool result" in log
    retried = api.agent_requests[2]  # the request after the refusal: the same conversation, shortened
    first_result = retried["messages"][2]["content"][0]["content"]
    assert first_result.startswith("[trimmed: the context grew too long]") and len(first_result) < 3000
    assert "[assistant] finished after trimming" in log


def test_what_program_md_has_the_agent_read_at_setup_is_named_counted_and_under_1000_lines():
    text = (ROOT / "program.md").read_text()
    said = re.search(r"Read `train.py` and `harness/metric.py` \(the evaluation\): about (\d+) lines in all",
                     text)
    assert said, "program.md's setup no longer says what to read and how long it is"
    actual = sum(len((ROOT / name).read_text().splitlines()) for name in ("train.py", "harness/metric.py"))
    assert actual < 1000 and abs(actual - int(said[1])) <= 0.05 * actual, (actual, said[1])
    assert "prepare.py (the constants" not in text and "evaluate_bpb" not in text  # no 1,300-line skim
