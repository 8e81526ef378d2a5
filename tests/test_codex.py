"""The real Codex CLI (npm @openai/codex) drives nights through `supervise.py --backend codex`,
against a local fake OpenAI Responses API (tests/fake_openai.py) that streams scripted shell calls
the way the real API does. Every training run is real (a tiny budget).

- A night of experiments (as root, as CI runs, and as the non-root user nobody): the baseline kept,
  a session that ends its turn to ask "shall I continue?" without training (a failed session,
  resumed), a crash, a discard, and the experiment budget's stop; the key only in the key proxy.
- An outage that outlasts --max-outage-hours ends the night, saying so.
- Ctrl-C during a training run ends the night at once, settled, nothing left running.
- Two workers, each with its own Codex, one store.
- A night on Slurm (the real single-node cluster of tests/test_slurm.py): its run is a job.
Skipped with a reason where the CLI is not installed; .ci/run installs it."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from harness import box, proc as processes, settings
from analysis.store import Store
from conftest import ROOT
from fake_openai import ResponsesAPI, command, outage, say
from repos import GIT_ENV, HARNESS, git, make_repo
from test_claude_code import PROBE, cwd_of, night_of  # noqa: F401  (the fixture: root, nobody)

sys.path.insert(0, str(ROOT / "bench"))
from slurm_local import PARTITION, LocalSlurm, available as slurm_available  # noqa: E402

SECRET = "sk-openai-test-REAL-CODEX-9f8e7d"
CODEX = shutil.which("codex")
pytestmark = pytest.mark.skipif(CODEX is None, reason="Codex CLI not installed (npm install -g "
                                "@openai/codex; .ci/run does it where npm exists)")
MODEL = "gpt-test"
# the CLI retries the API once a request (its defaults, 4 and 5, would make an outage slow)
COMMAND = ("codex exec --json --dangerously-bypass-approvals-and-sandbox -m " + MODEL
           + " -c model_providers.alr-night.request_max_retries=0"
           + " -c model_providers.alr-night.stream_max_retries=1")
# the probe of test_claude_code, looking for this key and this night's token
CODEX_PROBE = (PROBE.replace("'sk-ant-test-' + 'REAL-CLI-1b2c3d'", "'sk-openai-test-' + "
                             "'REAL-CODEX-9f8e7d'")
               .replace("os.environ.get('ANTHROPIC_API_KEY', '')",
                        "os.environ.get('OPENAI_API_KEY', '')"))
WAIT_S = 900  # a night of real tiny runs on a loaded 2-core machine ends well within this


def night_env(api, user_env=None):
    return {**os.environ, **GIT_ENV, "OPENAI_API_KEY": SECRET, "OPENAI_BASE_URL": api.url,
            "AUTORESEARCH_TIME_BUDGET": "3", **(user_env or {})}


def supervise(*options):
    return [*options, "supervise.py", "--backend", "codex", "--codex-command", COMMAND,
            "--restart-delay", "0.5", "--train-timeout", "700"]


def repo_and_home(tmp_path):
    """A repository holding the loop, and a home of its own for the CLI (~/.codex)."""
    repo = make_repo(tmp_path / "repo", HARNESS + ("supervise.py", "program.md"))
    (tmp_path / "home").mkdir()
    return repo, tmp_path / "home"


def experiment_script(python):
    py = f"'{python}'"
    train = f"{py} launch.py; {py} analyze.py"
    return [
        # session 1, program.md: the baseline, kept; then the CLI ends its turn to ask
        command(f"{train} && {py} analyze.py keep"),
        command(f"{py} .auto-log-research/probe.py"),
        # in the box (where bubblewrap works), the harness and the ledger are read-only
        command("touch harness/probe.py .auto-log-research/runs.jsonl 2>&1 | sed 's/^/box: /'"),
        say("The baseline is kept. Shall I continue with the ideas queue?"),
        # session 2 (the resume prompt): it reads the state and asks again, without training
        command(f"{py} analyze.py status"),
        say("I have read the state of the research. Should I go on?"),
        # session 3: an idea that crashes, discarded; an idea that is worse, discarded; the
        # budget (3 runs) runs out when the last row lands
        command("sed -i '1i raise RuntimeError(\"an idea that crashes\")' train.py && "
                "git commit -qam 'crashing idea'"),
        command(f"{train}; {py} analyze.py discard"),
        command("sed -i 's/^MATRIX_LR = 0.04 /MATRIX_LR = 0.4 /' train.py && "
                "git commit -qam 'matrix lr 0.4'"),
        command(f"{train} && {py} analyze.py discard"),
        say("Discarded. Shall I continue?"),
        command("sleep 600"),  # what would come next: the supervisor has ended the agent before
    ]


def test_real_codex_drives_a_night_resuming_a_session_that_stops_to_ask(night_of):  # noqa: F811
    repo, uid, python, user_env = night_of
    api = ResponsesAPI(experiment_script(python))
    store = repo / ".auto-log-research"
    store.mkdir(mode=0o700)
    (store / "probe.py").write_text(CODEX_PROBE)
    if uid is not None:
        shutil.chown(store, uid, uid)
        shutil.chown(store / "probe.py", uid, uid)
    try:
        done = subprocess.run([*supervise(python), "--max-experiments", "3"], cwd=repo,
                              env=night_env(api, user_env), capture_output=True, text=True,
                              timeout=WAIT_S, user=uid, group=uid,
                              extra_groups=[] if uid is not None else None)
    finally:
        api.close()
    log = (store / "supervisor.log").read_text()
    assert done.returncode == 0, done.stdout + done.stderr + log[-4000:]
    rows = Store(repo).read_ledger()
    assert [r["status"] for r in rows] == ["keep", "crash", "discard"], log[-3000:]
    # each run names the agent and model of its session, in the ledger, status and the report
    assert [r["agent"] for r in rows] == [f"codex {MODEL}"] * 3
    assert f"agent: codex {MODEL} (1 of the latest night's 1 run(s))" in log
    assert f"codex {MODEL}" in (store / "report.html").read_text()
    base = rows[0]["commit"]
    assert git(repo, "log", "--format=%s").splitlines() == [
        f"revert to best {base}", "matrix lr 0.4", f"revert to best {base}", "crashing idea",
        "baseline"]
    assert (repo / "train.py").read_text() == (ROOT / "train.py").read_text()
    # three sessions: the second ended to ask without training, a failure that was resumed
    status = (store / "status.log").read_text()
    assert [s.split(" | ")[1] for s in status.splitlines() if "session" in s][:5] == [
        "codex session 1 started", "codex session 1 exited (code 0); restarting",
        "codex session 2 started",
        "codex stopping without an experiment since " + re.search(
            r"codex stopping without an experiment since (\d\d:\d\d)", status)[1]
        + " (1 failed sessions); last error: I have read the state of the research. Should I "
          "go on?; retrying in 0 s",
        "codex session 3 started"]
    assert status.strip().splitlines()[-1].split(" | ")[1] == (
        "stopped: experiment budget used (3 runs)")
    # the record: every command, its output, the agent's words
    assert "[command] " in log and "launch.py; " in log
    assert "RuntimeError: an idea that crashes" in log  # the crash's output, as the agent saw it
    assert "[assistant] The baseline is kept. Shall I continue with the ideas queue?" in log
    # the key: the API got it, from the key proxy; the CLI and the agent's shell had the token
    assert api.keys == {SECRET}
    assert all(r["model"] == MODEL for r in api.requests)
    probe = re.search(r"\[result\] probe: (\d+) processes; key found in (.*); token seen (\w+)",
                      log)
    assert probe and int(probe[1]) >= 2 and probe[3] == "True", log[-4000:]
    if box.unavailable() is None:  # boxed: the key is nowhere the agent's shell can look
        assert probe[2] == "[]", probe[0]
        assert ("[result] box: touch: cannot touch 'harness/probe.py': Read-only file system\n"
                "box: touch: cannot touch '.auto-log-research/runs.jsonl': Read-only file "
                "system\n") in log
    for path in repo.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            assert SECRET.encode() not in path.read_bytes(), path
    assert processes.scripts_in(repo, "train.py") == []
    assert [p for p in processes.marked(settings.NIGHT_ENV, "")
            if cwd_of(p).startswith(str(repo))] == []


def test_an_outage_longer_than_max_outage_hours_ends_the_codex_night(prepared, tmp_path):
    repo, home = repo_and_home(tmp_path)
    api = ResponsesAPI([outage(10_000)])
    try:  # 0.002 h: 7.2 s of failed sessions
        done = subprocess.run([*supervise(sys.executable), "--max-outage-hours", "0.002"],
                              cwd=repo, env=night_env(api, {"HOME": str(home)}),
                              capture_output=True, text=True, timeout=WAIT_S)
    finally:
        api.close()
    store = repo / ".auto-log-research"
    status = (store / "status.log").read_text()
    assert done.returncode == 1, done.stderr + status
    last = status.strip().splitlines()[-1].split(" | ")[1]
    assert re.fullmatch(r"stopped: API unreachable since \d\d:\d\d \((\d+) sessions without a "
                        r"run\): .+", last), last
    assert int(re.search(r"\((\d+) sessions", last)[1]) >= 2  # resumed, until the outage's end
    assert api.failures_sent >= 4  # each session: a request and its one retry
    assert "[codex] API error: Reconnecting... 1/1" in (store / "supervisor.log").read_text()
    assert Store(repo).read_ledger() == []


def wait_for(predicate, what: str, limit_s: float = WAIT_S):
    """Wait until predicate() holds (a process, a file); limit_s only ends a hang."""
    end = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < end, f"still waiting for {what}"
        time.sleep(0.2)


def test_ctrl_c_during_a_training_run_ends_the_codex_night_at_once(prepared, tmp_path):
    repo, home = repo_and_home(tmp_path)
    py = sys.executable
    api = ResponsesAPI([command(f"AUTORESEARCH_TIME_BUDGET=600 {py} launch.py; {py} analyze.py"),
                        say("done")])
    night = subprocess.Popen(supervise(sys.executable), cwd=repo,
                             env=night_env(api, {"HOME": str(home)}), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: processes.scripts_in(repo, "train.py"), "train.py to start")
        night.send_signal(signal.SIGINT)
        out, _ = night.communicate(timeout=WAIT_S)
    finally:
        api.close()
        if night.poll() is None:
            night.kill()
    status = (repo / ".auto-log-research" / "status.log").read_text()
    assert night.returncode == 130, out + status
    assert "stopped by Ctrl-C" in status
    (cut,) = Store(repo).read_ledger()  # the cut run, archived as the night's and settled
    assert (cut["status"], cut["agent"]) == ("crash", f"codex {MODEL}") and cut["night"]
    assert processes.scripts_in(repo, "train.py") == []
    assert [p for p in processes.marked(settings.NIGHT_ENV, "")
            if cwd_of(p).startswith(str(repo))] == []


def test_two_workers_each_with_its_own_codex_share_one_store(prepared, tmp_path):
    repo, home = repo_and_home(tmp_path)
    py = sys.executable
    api = ResponsesAPI({f"You are worker {worker} ": [
        command(f"{py} launch.py; {py} analyze.py; echo I am worker $AUTORESEARCH_WORKER"),
        say("one run done; continue?")] for worker in ("gpu0", "gpu1")})
    try:
        done = subprocess.run([*supervise(sys.executable), "--gpus", "0,1", "--tag", "cx",
                               "--max-experiments", "2"], cwd=repo,
                              env=night_env(api, {"HOME": str(home)}), capture_output=True,
                              text=True, timeout=WAIT_S)
    finally:
        api.close()
    store = repo / ".auto-log-research"
    status = (store / "status.log").read_text()
    assert done.returncode == 0, done.stderr + status
    rows = Store(repo).read_ledger()
    assert sorted(r["worker"] for r in rows) == ["gpu0", "gpu1"], status
    for worker in ("gpu0", "gpu1"):
        log = (store / f"supervisor-{worker}.log").read_text()
        assert "=== codex session 1 (codex exec" in log and f"I am worker {worker}\n" in log
    assert api.keys == {SECRET}
    assert processes.scripts_in(repo, "train.py") == []


def test_a_codex_night_on_slurm_trains_its_run_as_a_job(prepared, tmp_path):
    """--launcher slurm, the real single-node cluster of tests/test_slurm.py: the agent's one command
    becomes a Slurm job."""
    if slurm_available() is not None:
        pytest.skip(f"no local Slurm: {slurm_available()}")
    folder = tempfile.mkdtemp(prefix="alr-slurm-", dir="/tmp")  # short: munge's socket path
    local = LocalSlurm(folder)
    cluster = local.start()
    repo, home = repo_and_home(tmp_path)
    py = sys.executable
    api = ResponsesAPI([command(f"{py} launch.py; {py} analyze.py"), say("trained; continue?")])
    try:
        done = subprocess.run([*supervise(sys.executable), "--launcher", "slurm", "--partition",
                               PARTITION, "--gres", "gpu:1", "--max-experiments", "1"], cwd=repo,
                              env={**night_env(api, {"HOME": str(home)}), **cluster},
                              capture_output=True, text=True, timeout=WAIT_S)
    finally:
        api.close()
        local.stop()
        shutil.rmtree(folder, ignore_errors=True)
    status = (repo / ".auto-log-research" / "status.log").read_text()
    assert done.returncode == 0, done.stderr + status
    assert "; training on Slurm;" in status.splitlines()[0]
    (row,) = Store(repo).read_ledger()
    archived = (repo / ".auto-log-research" / row["run_id"] / "run.log").read_text()
    assert re.search(r"^launcher: slurm job \d+ ended COMPLETED \(exit code 0:0", archived, re.M)
    assert row["val_bpb"] > 0 and api.keys == {SECRET}
