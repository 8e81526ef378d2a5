"""Runs executed by the night (night/runs.py), with real boxes and real tiny CPU runs: the agent's
`launch.py`, in its box, has the night's runner train outside it, and its `analyze.py` has it write
the store, which is read-only in the box; train.py trains in a box of its own,
from which it sees neither launch.py nor the evaluator and can change nothing but its run directory; the
seal comes from outside every box; the agent's own variables reach train.py but never the harness's
settings; and an agent that ends its launch.py mid-run (Ctrl-C, a timeout) leaves a sealed crash.
Skipped with the reason where bubblewrap is missing; .ci/run installs it."""

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from harness import box, contract, settings
from night import sandbox
from night.runs import RunService
from repos import GIT_ENV, HARNESS, analyze, git, make_repo

pytestmark = pytest.mark.skipif(box.unavailable() is not None,
                                reason=f"no bubblewrap box here ({box.unavailable()}); .ci/run installs it")

# Put at the top of train.py: what the experiment can see and change from where it trains.
LOOK = r"""import json as _json, os as _os
def _look():
    seen = []
    for pid in _os.listdir('/proc'):
        try:
            seen.append(open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\0', b' ').decode())
        except (OSError, NotADirectoryError):
            pass
    tried = {}
    for target in (_os.path.join(_os.environ['AUTORESEARCH_CACHE'], 'seals', 'forged.json'),
                   'harness/metric.py', '.auto-log-research/runs.jsonl', 'notes.txt'):
        try:
            open(target, 'a').close()
            tried[target.split('/')[-1]] = 'written'
        except OSError as e:
            tried[target.split('/')[-1]] = 'refused'
    _json.dump({'processes': seen, 'tried': tried, 'seed': _os.environ.get('SEED'),
                'budget': _os.environ.get('AUTORESEARCH_TIME_BUDGET')}, open('look.json', 'w'))
_look()
"""


@pytest.fixture
def night_runner(prepared, tmp_path, monkeypatch):
    """A repository whose train.py looks around first, the night's runner of it, and the command
    that runs `launch.py` in the agent's box as the agent's shell would (SEED=7, and a time budget
    of its own that must not count)."""
    monkeypatch.setenv(settings.TIME_BUDGET_ENV, "3")  # the night's
    repo = make_repo(tmp_path / "repo", HARNESS)
    (repo / ".auto-log-research").mkdir(mode=0o700)
    (repo / "train.py").write_text(LOOK + (repo / "train.py").read_text())
    git(repo, "commit", "-qam", "look around")
    service = RunService(types.SimpleNamespace(args=types.SimpleNamespace(pass_env=set()),
                                               night="test-night", agent="codex gpt-test",
                                               repo=repo))
    agent_env = {**os.environ, **GIT_ENV, settings.RUN_SOCKET_ENV: str(service.socket), "SEED": "7",
                 settings.TIME_BUDGET_ENV: "999"}
    command = sandbox.box([sys.executable, "launch.py"], repo, runner=service.folder)
    yield repo, service, command, agent_env
    service.close()


def test_the_agents_launch_has_the_night_train_outside_its_box(night_runner):
    repo, service, command, agent_env = night_runner
    agent_env = {**agent_env, settings.AGENT_ENV: "claude a-model-it-would-rather-name"}
    done = subprocess.run(command, cwd=repo, env=agent_env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "\nval_bpb:" in done.stdout  # the run's output, streamed back to the agent's shell
    look = json.loads((repo / "look.json").read_text())
    # train.py's own PID namespace: its box's init (bwrap, whose arguments name the files it binds), the
    # box's stopper and train.py's own; no launch.py, no evaluator, no agent
    inside = [p for p in look["processes"] if not p.startswith("bwrap ")]
    assert not [p for p in inside if "launch.py" in p or "import evaluation" in p], inside
    assert len(look["processes"]) <= 5, look["processes"]
    assert look["tried"] == {"forged.json": "refused", "metric.py": "refused",
                             "runs.jsonl": "refused", "notes.txt": "written"}
    assert (look["seed"], look["budget"]) == ("7", "3")  # the agent's variable; the night's budget
    summary = json.loads((repo / contract.RUN_SUMMARY).read_text())
    assert summary["status"] == "ok" and summary["time_budget_s"] == 3.0
    assert contract.seal_path(repo, summary["started_at"]).exists()  # sealed, from outside
    assert (repo / "run.log").read_text().endswith(done.stdout[-200:])

    # the agent's analyze.py, in the same box (where the store is read-only), has the runner write
    def analyze_in_box(*args):
        return subprocess.run(sandbox.box([sys.executable, "analyze.py", *args], repo,
                                          runner=service.folder),
                              cwd=repo, env=agent_env, capture_output=True, text=True, timeout=300)
    archived = analyze_in_box()
    assert archived.returncode == 0, archived.stdout + archived.stderr
    assert "verdict:" in archived.stdout  # its output, streamed back
    row = json.loads((repo / ".auto-log-research" / "runs.jsonl").read_text().splitlines()[-1])
    assert (row["status"], row["integrity"]) == ("pending", []), row  # sealed and believed
    # the night's label of its agent, not one the agent's shell sets (it names another model)
    assert row["agent"] == "codex gpt-test"
    kept = analyze_in_box("keep")
    assert kept.returncode == 0 and f"kept {row['run_id']}" in kept.stdout, kept.stdout + kept.stderr
    assert "## Current Best" in (repo / ".auto-log-research" / "notes" / "insights.md").read_text()
    refused = analyze_in_box("reseal")
    assert (refused.returncode, refused.stdout) == (1, (  # the runner's output is one stream
        "error: reseal is the human's command, after checking the ledger by hand: a night's agent "
        "cannot give it\n"))


def test_a_run_fabricated_in_the_agents_box_cannot_be_sealed(night_runner):
    """Issue 19's fabricated run: the agent writes a run's files and seals them with the harness's
    own function, from its shell. Where the night trains, the seals are out of its reach."""
    repo, service, _, agent_env = night_runner
    contract.cache_path(contract.SEALS_DIR).mkdir(exist_ok=True)  # as after the night's first run
    forge = ("import sys; sys.path.insert(0, '.'); from harness import contract; "
             "contract.write_seal('.', '2026-12-03T01:02:03+0000', '{}', 'f' * 64, 300, 0.25)")
    done = subprocess.run(sandbox.box([sys.executable, "-c", forge], repo, runner=service.folder),
                          cwd=repo, env=agent_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == (
        f"OSError: [Errno 30] Read-only file system: "
        f"'{contract.seal_path(repo, '2026-12-03T01:02:03+0000')}'"), done.stderr
    assert not contract.seal_path(repo, "2026-12-03T01:02:03+0000").exists()


def test_an_agent_that_ends_its_launch_mid_run_leaves_a_sealed_crash(night_runner):
    repo, service, command, agent_env = night_runner
    agent_env = {**agent_env}
    os.environ[settings.TIME_BUDGET_ENV] = "300"  # long enough to be cut (the fixture restores it)
    agent = subprocess.Popen(command, cwd=repo, env=agent_env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    metrics = repo / contract.RUN_METRICS
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert agent.poll() is None and time.monotonic() < deadline, "the run never got going"
        time.sleep(0.2)
    box.end(agent)  # the session ends (Ctrl-C, the CLI's timeout): the box and its launch.py go
    while service.runs:  # the runner ends the run; train.py writes its crash summary; sealed
        assert time.monotonic() < deadline, "the run outlived its asker"
        time.sleep(0.2)
    summary = json.loads((repo / contract.RUN_SUMMARY).read_text())
    assert summary["status"] == "crash", summary
    assert contract.seal_path(repo, summary["started_at"]).exists()
    assert analyze(repo).returncode == 0
    row = json.loads((repo / ".auto-log-research" / "runs.jsonl").read_text().splitlines()[-1])
    assert row["status"] == "crash"
