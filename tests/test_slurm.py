"""Training runs as Slurm jobs, against a real single-node Slurm on localhost (bench/slurm_local.py: munge,
slurmctld and slurmd, CPU-only, one fake GPU): a night through `supervise.py --launcher slurm` whose
stand-in agent trains twice and has a third job cancelled mid-run (a crash with the scheduler's words);
a pre-empted job submitted again once, and twice pre-empted a crash; a job that cannot be submitted.
Skipped, with the reason, where Slurm is not installed or the tests do not run as root."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from harness import slurm
from analysis.store import Store
from conftest import ROOT
from repos import GIT_ENV, night_repo

sys.path.insert(0, str(ROOT / "bench"))
from slurm_local import PARTITION, URGENT_PARTITION, LocalSlurm, available  # noqa: E402

pytestmark = pytest.mark.skipif(available() is not None, reason=f"no local Slurm: {available()}")


@pytest.fixture(scope="module")
def cluster():
    folder = tempfile.mkdtemp(prefix="alr-slurm-", dir="/tmp")  # short: munge's socket path has a limit
    local = LocalSlurm(folder)
    env = local.start()
    yield env
    local.stop()
    shutil.rmtree(folder, ignore_errors=True)  # the cluster's files: config, state, logs, munge key


def slurm_env(cluster, **extra):
    return {**os.environ, **GIT_ENV, **cluster, "AUTORESEARCH_LAUNCHER": "slurm",
            "AUTORESEARCH_SLURM_PARTITION": PARTITION, "AUTORESEARCH_SLURM_GRES": "gpu:1",
            "AUTORESEARCH_TIME_BUDGET": "3", **extra}


def wait_for(predicate, what, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def job_ids(log: Path) -> list:
    return re.findall(r"^launcher: submitted slurm job (\d+)", log.read_text() if log.exists() else "", re.M)


def job_state(cluster, job) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True,
                         env={**os.environ, **cluster}).stdout
    return slurm.job_state(slurm.parse_job(out)) or ""


def launch(tmp_path, env):
    """A repository, and program.md's training command started in it: (repo, env, run.log, the process)."""
    repo = night_repo(tmp_path / "repo")
    log = repo / "run.log"
    with open(log, "w") as out:
        run = subprocess.Popen([sys.executable, "launch.py"], cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)
    return repo, env, log, run


def preempt(env):
    """A job in the higher priority tier for the one GPU: it pre-empts the running training job."""
    urgent = subprocess.run(["sbatch", "--parsable", "-p", URGENT_PARTITION, "--gres=gpu:1", "-o", "/dev/null",
                             "--wrap", "sleep 1"], capture_output=True, text=True, env=env)
    assert urgent.returncode == 0, urgent.stderr


def analyze(repo, env, *args):
    return subprocess.run([sys.executable, "analyze.py", *args], cwd=repo, env=env, capture_output=True, text=True)


# The agent of a night on Slurm: it trains with program.md's one command; the third run it has cancelled by
# the scheduler (`scancel`) once train.py is training, then analyses and discards it.
STAND_IN = f"""#!{sys.executable}
import json, os, re, subprocess, sys, time
py, calls = sys.executable, os.environ["CALLS"]
sys.stdin.read()
json.dump(dict(os.environ), open(os.path.join(calls, "env"), "w"))
def sh(cmd):
    p = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    open(os.path.join(calls, "log"), "a").write(f"$ {{cmd}}\\n{{p.stdout}}{{p.stderr}}[exit {{p.returncode}}]\\n")
    return p
if os.path.exists(os.path.join(calls, "done")):
    time.sleep(3600)
for seed in (42, 43):
    sh(f"SEED={{seed}} {{py}} launch.py")
    sh(py + " analyze.py")
    sh(py + " analyze.py keep")
# an idea that stalls after its first step (STALL, the agent's own variable, reaches train.py; the night's
# settings, the time budget too, are the night's), so that the scheduler's cancel finds train.py training
source = open("train.py").read()
open("train.py", "w").write(source.replace("    if step == 0:  # after", "    if step == 0 and os.environ.get('STALL'):\\n"
                                           "        time.sleep(600)\\n    if step == 0:  # after", 1))
if "STALL" not in open("train.py").read():
    sys.exit("train.py no longer has the line this stand-in stalls after: update the test")
sh("git commit -qam 'a stalling idea'")
open("run.log", "w").close()
run = subprocess.Popen(py + " launch.py", shell=True, env={{**os.environ, "STALL": "1"}})
while not re.search(r"^step 0000", open("run.log").read(), re.M):
    time.sleep(0.2)
job = re.search(r"submitted slurm job (\\d+)", open("run.log").read())[1]
sh("scancel " + job)
run.wait()
sh(py + " analyze.py")
sh(py + " analyze.py discard")
open(os.path.join(calls, "done"), "w").write(job)
time.sleep(3600)
"""


def test_a_night_on_slurm_trains_as_jobs_and_a_cancelled_job_is_a_crash_with_the_schedulers_reason(
        prepared, cluster, tmp_path):
    repo = night_repo(tmp_path / "repo")
    # where the agent's box can read and write (the store's notes)
    calls = repo / ".auto-log-research" / "notes" / ".test-calls"
    calls.mkdir(parents=True)
    agent = calls / "agent.py"
    agent.write_text(STAND_IN)
    env = {**os.environ, **GIT_ENV, **cluster, "CALLS": str(calls), "AUTORESEARCH_TIME_BUDGET": "3"}
    proc = subprocess.run([sys.executable, "supervise.py", "--backend", "claude", "--launcher", "slurm",
                           "--partition", PARTITION, "--gres", "gpu:1", "--claude-command", f"{sys.executable} {agent}",
                           "--pass-env", "CALLS", "--max-experiments", "3", "--restart-delay", "0"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    log = (calls / "log").read_text() if (calls / "log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:] + log[-5000:]
    assert "stopped: experiment budget used (3 runs)" in proc.stdout
    seen = json.loads((calls / "env").read_text())
    assert (seen["AUTORESEARCH_LAUNCHER"], seen["AUTORESEARCH_SLURM_PARTITION"], seen["AUTORESEARCH_SLURM_GRES"]) == \
        ("slurm", PARTITION, "gpu:1")

    rows = Store(repo).read_ledger()
    assert [r["status"] for r in rows] == ["keep", "keep", "crash"], \
        [(r["run_id"], r["status"], r.get("error"), r.get("integrity")) for r in rows]
    store = repo / ".auto-log-research"
    for r in rows[:2]:  # trained as Slurm jobs: the job's output is the run's log, and the number is the harness's
        archived = (store / r["run_id"] / "run.log").read_text()
        assert re.search(r"^launcher: submitted slurm job \d+ ", archived, re.M)
        assert re.search(r"^launcher: slurm job \d+ ended COMPLETED \(exit code 0:0", archived, re.M), archived[-2000:]
        assert r["val_bpb"] > 0 and r["device"] == "cpu" and r["integrity"] == []
    assert [r["seed"] for r in rows[:2]] == [42, 43]
    crash = rows[2]  # the agent may be ended at the stop before its discard: the supervisor settles it then
    job = job_ids(store / crash["run_id"] / "run.log")[0]
    assert crash["error"].startswith(f"launcher: slurm job {job} ended CANCELLED (*** JOB {job} ON "), crash["error"]
    assert "; train.py: " in crash["error"]  # train.py's own crash summary, written on the scheduler's SIGTERM
    assert crash["error"] in (store / crash["run_id"] / "analysis.md").read_text()
    queue = subprocess.run(["squeue", "-h"], capture_output=True, text=True, env={**os.environ, **cluster})
    assert queue.returncode == 0 and queue.stdout.strip() == ""


def test_a_preempted_run_is_submitted_again_once_and_then_finishes(prepared, cluster, tmp_path):
    repo, env, log, run = launch(tmp_path, slurm_env(cluster, AUTORESEARCH_TIME_BUDGET="6"))
    first = wait_for(lambda: job_ids(log), "the job's submission")[0]
    wait_for(lambda: re.search(r"^step 0000", log.read_text(), re.M), "training to start")
    preempt(env)
    assert run.wait(timeout=600) == 0, log.read_text()[-3000:]
    text = log.read_text()
    ids = job_ids(log)
    assert len(ids) == 2 and ids[0] == first
    assert f"launcher: slurm job {first} was PREEMPTED (*** JOB {first} ON " in text
    assert "DUE TO PREEMPTION ***): submitting the run again, once" in text
    assert re.search(rf"^launcher: slurm job {ids[1]} ended COMPLETED \(exit code 0:0", text, re.M)
    out = analyze(repo, env)
    assert out.returncode == 0 and "status pending" in out.stdout, out.stdout + out.stderr
    assert Store(repo).read_ledger()[-1]["integrity"] == []


def test_a_run_preempted_twice_is_a_crash_with_the_reason(prepared, cluster, tmp_path):
    repo, env, log, run = launch(tmp_path, slurm_env(cluster, AUTORESEARCH_TIME_BUDGET="300"))
    for attempt in (1, 2):
        job = wait_for(lambda: len(job_ids(log)) >= attempt and job_ids(log)[attempt - 1], f"submission {attempt}")
        wait_for(lambda: job_state(cluster, job) == "RUNNING", f"job {job} running")
        preempt(env)
    assert run.wait(timeout=600) == 1
    assert len(job_ids(log)) == 2
    out = analyze(repo, env)
    assert out.returncode == 0, out.stderr
    row = Store(repo).read_ledger()[-1]
    assert row["status"] == "crash"
    assert row["error"].startswith(f"launcher: slurm job {job_ids(log)[1]} ended PREEMPTED (*** JOB "), row["error"]


def test_a_job_slurm_refuses_is_a_crash_that_says_why(prepared, cluster, tmp_path):
    repo = night_repo(tmp_path / "repo")
    env = slurm_env(cluster, AUTORESEARCH_SLURM_PARTITION="no-such-partition")
    with open(repo / "run.log", "w") as out:
        code = subprocess.run([sys.executable, "launch.py"], cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    assert code == 1
    out = analyze(repo, env)
    assert out.returncode == 0, out.stderr
    row = Store(repo).read_ledger()[-1]
    assert row["status"] == "crash"
    assert row["error"].startswith("launcher: slurm job - ended BOOT_FAIL (never submitted: sbatch failed: ")
    assert "invalid partition" in row["error"].lower(), row["error"]
