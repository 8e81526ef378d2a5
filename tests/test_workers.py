"""Several workers on one store: a night with `supervise.py --gpus 0,1,2` whose three stand-in agents run
real tiny CPU trainings in their own worktrees (one ledger, one best, no idea twice, worktrees removed);
keep, sync and discard across worktrees; idea claims (a dead worker's claim is free again); the store's
lock under concurrent writers from several worktrees; per-worker stop rules and status."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import proc as processes, settings
from night import rules, workers
from analysis import claims
from analysis.store import Store
from harness.contract import HarnessError
from conftest import ROOT
from fake_api import StreamingMessagesAPI
from repos import GIT_ENV, fake_run, git, ledger, night_repo

SECRET = "sk-ant-test-WORKERS-4e8a1f"

IDEAS = ["set WEIGHT_DECAY to 0.1", "set MATRIX_LR to 0.03", "set WARMDOWN_RATIO to 0.4", "set SCALAR_LR to 0.4"]

# A worker's agent doing what program.md's "Several workers" section says, with real training: the
# baseline once under its worker's seed, then one idea: sync, claim the first free idea, edit, commit,
# train, analyse, keep or discard. Then it waits to be ended at the stop.
STAND_IN = f"""#!{sys.executable}
import json, os, re, shlex, subprocess, sys, time
py, w, seed = sys.executable, os.environ["AUTORESEARCH_WORKER"], int(os.environ["AUTORESEARCH_WORKER_SEED"])
calls = os.environ["CALLS"]
open(os.path.join(calls, "prompt." + w), "a").write(sys.stdin.read())
json.dump(dict(os.environ), open(os.path.join(calls, "env." + w), "w"))
if os.environ.get("ANTHROPIC_BASE_URL"):  # what the CLI does first: ask its API (its worker's key proxy)
    import urllib.request
    ask = urllib.request.Request(os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages", data=b"{{}}",
                                 headers={{"x-api-key": os.environ["ANTHROPIC_API_KEY"]}})
    open(os.path.join(calls, "api." + w), "w").write(str(urllib.request.urlopen(ask, timeout=60).status))
def sh(cmd, check=True):
    p = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    open(os.path.join(calls, "log." + w), "a").write(f"$ {{cmd}}\\n{{p.stdout}}{{p.stderr}}[exit {{p.returncode}}]\\n")
    if check and p.returncode:
        sys.exit(f"{{cmd}} failed: {{p.stderr}}")
    return p
def train(seed=None):
    sh(("SEED=%d " % seed if seed is not None else "") + py + " launch.py", check=False)
    sh(py + " analyze.py")
    rows = [json.loads(line) for line in open(".auto-log-research/runs.jsonl")]
    return [r for r in rows if r.get("worker") == w][-1]
done = os.path.join(calls, "done." + w)
if not os.path.exists(done):
    base = train(seed=seed)
    sh(py + " analyze.py keep " + base["run_id"])
    sh(py + " analyze.py sync")
    ideas = [l.strip() for l in open(".auto-log-research/notes/ideas_queue.md") if re.match(r"\\d+\\.", l.strip())]
    idea = next((i for i in ideas if sh(py + " analyze.py claim " + shlex.quote(i), check=False).returncode == 0), None)
    if idea is None:
        sys.exit("no free idea")
    name, value = re.search(r"set (\\w+) to (\\S+)", idea).groups()
    source = open("train.py").read()
    open("train.py", "w").write(re.sub(rf"^{{name}} = \\S+", f"{{name}} = {{value}}", source, count=1, flags=re.M))
    sh("git commit -qam " + shlex.quote(idea))
    run = train()
    sh(py + " analyze.py " + ("keep" if run["verdict"] == "keep" else "discard"))
    open(done, "w").write(run["run_id"])
time.sleep(3600)
"""


def test_three_workers_share_one_store_one_best_and_never_test_an_idea_twice(prepared, tmp_path):
    repo = night_repo(tmp_path / "repo")
    store = repo / ".auto-log-research"
    store.mkdir()
    # in the store's notes, which every worker's box can read and write (the agents run boxed where
    # bubblewrap works)
    calls = store / "notes" / ".test-calls"
    calls.mkdir(parents=True)
    agent = store / "agent.py"
    agent.write_text(STAND_IN)
    (store / "notes" / "ideas_queue.md").write_text("# Ideas queue\n\n" + "".join(f"{i + 1}. {idea}\n" for i, idea in
                                                                          enumerate(IDEAS)))
    api = StreamingMessagesAPI([])
    env = {**os.environ, **GIT_ENV, "CALLS": str(calls), "AUTORESEARCH_TIME_BUDGET": "3",
           "ANTHROPIC_API_KEY": SECRET, "ANTHROPIC_BASE_URL": api.url}
    try:
        proc = subprocess.run([sys.executable, "supervise.py", "--backend", "claude", "--gpus", "0,1,2", "--tag", "t1",
                               "--claude-command", f"{sys.executable} {agent}", "--pass-env", "CALLS",
                               "--max-experiments", "6", "--restart-delay", "0"],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    finally:
        api.close()
    logs = "".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(calls.glob("log.*")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs[-6000:]
    assert "stopped: experiment budget used (6 runs)" in proc.stdout

    rows = ledger(repo)
    workers = ["gpu0", "gpu1", "gpu2"]
    # no lost and no duplicated row: each worker's two runs, each archived once
    assert sorted(r["worker"] for r in rows) == sorted(workers * 2), [(r["run_id"], r.get("worker")) for r in rows]
    assert len({r["run_id"] for r in rows}) == 6 and all((store / r["run_id"] / "run_summary.json").exists() for r in rows)
    assert len((store / "results.tsv").read_text().splitlines()) == 7
    assert all(r["status"] in ("keep", "discard") for r in rows), [(r["run_id"], r["status"]) for r in rows]
    # the baseline runs of the three workers are one pool (same code, same CPU), under three seeds
    baseline = [r for r in rows if r["description"] == "baseline"]
    assert sorted(r["seed"] for r in baseline) == [42, 43, 44] and {r["status"] for r in baseline} == {"keep"}
    assert len({r["train_sha256"] for r in baseline}) == 1
    # no idea tested twice: three distinct ideas, one per worker, each recorded as tested with its run
    tested = [c for c in json.loads((store / "claims.json").read_text())["claims"] if c["state"] == "tested"]
    assert len(tested) == 3 and len({c["key"] for c in tested}) == 3 and {c["worker"] for c in tested} == set(workers)
    idea_runs = [r for r in rows if r["description"] != "baseline"]
    assert sorted(r["description"] for r in idea_runs) == sorted(c["idea"] for c in tested)
    assert {c["run_id"] for c in tested} == {r["run_id"] for r in idea_runs}
    # one best for all: a discard restores the store's best at that moment on the worker's own branch, with a
    # commit; a kept idea is the best from then on. Usually no idea is kept: then every branch ends on the baseline
    kept = {}
    for r in rows:
        if r["status"] == "keep":
            kept.setdefault(r["train_sha256"], []).append(r)
    best = min(kept.values(), key=lambda group: sum(r["val_bpb"] for r in group) / len(group))
    kept_commits = {r["commit"] for r in rows if r["status"] == "keep"}
    for w in workers:
        branch, run = f"autoresearch/t1-{w}", next(r for r in idea_runs if r["worker"] == w)
        if run["status"] == "discard":
            subject = git(repo, "log", "-1", "--format=%s", branch).strip()
            assert subject.startswith("revert to best ") and subject.split()[-1] in kept_commits, (w, subject)
            assert git(repo, "show", f"{branch}:train.py") == git(repo, "show", f"{subject.split()[-1]}:train.py")
        else:
            assert git(repo, "show", f"{branch}:train.py") == (store / run["run_id"] / "train.py").read_text()
    if len(kept) == 1:
        assert {git(repo, "show", f"autoresearch/t1-{w}:train.py") for w in workers} == \
            {(store / best[0]["run_id"] / "train.py").read_text()}
    status = subprocess.run([sys.executable, "analyze.py", "status"], cwd=repo, capture_output=True, text=True)
    assert status.stdout.startswith(f"best: {best[0]['commit']} ")
    # each worker's agent had a token of its own for its own key proxy, which sent the key on; none had the key
    tokens = {w: json.loads((calls / f"env.{w}").read_text())["ANTHROPIC_API_KEY"] for w in workers}
    assert len(set(tokens.values())) == 3 and all(t.startswith("alr-night-") for t in tokens.values()), tokens
    assert all((calls / f"api.{w}").read_text() == "200" for w in workers) and api.keys == {SECRET}
    assert not any(SECRET in p.read_text() for p in calls.iterdir())
    # each worker ran on its own GPU id, in its own worktree, and knew it from its first prompt
    for i, w in enumerate(workers):
        seen = json.loads((calls / f"env.{w}").read_text())
        assert seen["CUDA_VISIBLE_DEVICES"] == str(i) and seen["AUTORESEARCH_WORKER"] == w
        assert (calls / f"prompt.{w}").read_text().startswith(f"You are worker {w} of a night with several workers")
    assert "workers:" in status.stdout and all(f"  {w:<8} 2 run(s)" in status.stdout for w in workers), status.stdout
    # the status line shows each worker; worktrees are gone, the branches stay
    lines = (store / "status.log").read_text()
    assert all(f"| worker {w} | stopped: experiment budget used" in lines for w in workers), lines
    assert not (repo / ".worktrees" / "gpu0").exists() and git(repo, "worktree", "list").count("\n") == 1
    assert set(git(repo, "branch", "--format=%(refname:short)").split()) == {"main", *(f"autoresearch/t1-{w}" for w in workers)}
    html = (store / "report.html").read_text()  # the night's report, rewritten at the end: one row per worker
    assert 'id="workers"' in html and all(f'<tr><td class="l"><code>{w}</code></td><td>2</td>' in html for w in workers)


def night_of_sleeping_agents(tmp_path, tag: str):
    """A night of two workers whose agents only sleep, once both agents run: (the night's process,
    its repository, its status.log)."""
    repo = night_repo(tmp_path / "repo")
    (repo / ".auto-log-research").mkdir()
    agent = repo / ".auto-log-research" / "agent.py"  # where the workers' boxes can read it
    agent.write_text(f"#!{sys.executable}\nimport sys, time\nsys.stdin.read()\ntime.sleep(3600)\n")
    proc = subprocess.Popen([sys.executable, "supervise.py", "--backend", "claude", "--gpus", "0,1", "--tag", tag,
                             "--claude-command", f"{sys.executable} {agent}", "--restart-delay", "0"],
                            cwd=repo, env={**os.environ, **GIT_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    status = repo / ".auto-log-research" / "status.log"
    deadline = time.time() + 300
    while not all(f"| worker {w} | claude session 1 started" in (status.read_text() if status.exists() else "")
                  for w in ("gpu0", "gpu1")):
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    return proc, repo, status


def test_ctrl_c_stops_every_worker_and_the_night_cleans_up(tmp_path):
    proc, repo, status = night_of_sleeping_agents(tmp_path, "t2")
    proc.send_signal(signal.SIGINT)  # to the night alone, as `kill -INT`: it passes it on to every worker
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    lines = status.read_text()
    assert all(f"| worker {w} | stopped: stopped by Ctrl-C" in lines for w in ("gpu0", "gpu1")), lines
    assert "stopped: stopped by Ctrl-C" in lines.splitlines()[-1] and "| worker " not in lines.splitlines()[-1]
    assert not (repo / ".worktrees" / "gpu0").exists() and not (repo / ".worktrees" / "gpu1").exists()
    assert [p for p in processes.marked(settings.NIGHT_ENV, "") if cwd_inside(p, repo)] == []  # agents and workers are gone


def test_a_night_killed_outright_stops_every_worker_and_its_agent(tmp_path):
    """The OOM killer takes the night's own supervisor: its workers get SIGTERM from the kernel (they
    die with their parent) and stop as on a signal, each taking its agent's box along."""
    night, repo, status = night_of_sleeping_agents(tmp_path, "t5")
    workers = [int(m) for m in re.findall(r"worker gpu\d started \(pid (\d+)", status.read_text())]
    assert len(workers) == 2
    night.kill()
    night.communicate()
    def left():  # the night's processes, and the workers themselves (an exiting worker's environ
        # can no longer be read, so it is no longer "marked", a moment before it ends)
        return ([p for p in processes.marked(settings.NIGHT_ENV, "") if cwd_inside(p, repo)]
                + [pid for pid in workers if processes.running(pid)])
    deadline = time.time() + 300  # each worker ends its agent (with the box's grace) and settles
    while left() and time.time() < deadline:
        time.sleep(0.2)
    assert left() == []
    lines = status.read_text()
    assert all(f"| worker {w} | stopped: stopped by a signal (SIGTERM)" in lines for w in ("gpu0", "gpu1")), lines


def cwd_inside(pid: int, folder: Path) -> bool:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")).is_relative_to(folder)
    except OSError:
        return False  # gone meanwhile


def test_a_worktree_with_a_store_of_its_own_is_refused_in_one_line(tmp_path):
    repo = night_repo(tmp_path / "repo")
    git(repo, "worktree", "add", "-q", "-b", "autoresearch/t3-gpu0", str(repo / ".worktrees" / "gpu0"))
    (repo / ".worktrees" / "gpu0" / ".auto-log-research").mkdir()  # an agent made one there
    proc = subprocess.run([sys.executable, "supervise.py", "--backend", "claude", "--gpus", "0", "--tag", "t3",
                           "--claude-command", "true"], cwd=repo, env={**os.environ, **GIT_ENV}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: cannot create the workers' worktrees: ") and "is a folder of its own" in proc.stderr


# ---------------------------------------------------------------------------
# keep, sync and discard across worktrees (synthetic runs, real git worktrees)
# ---------------------------------------------------------------------------

def add_worktree(repo: Path, name: str) -> Path:
    """A worker's worktree, as supervise.py's Workers.prepare makes it: its branch, the store linked."""
    path = repo / ".worktrees" / name
    git(repo, "worktree", "add", "-q", "-b", f"autoresearch/t-{name}", str(path))
    (path / ".auto-log-research").symlink_to(repo / ".auto-log-research", target_is_directory=True)
    return path


def analyze(cwd, *args, worker=None, life=None):
    env = {**os.environ, **GIT_ENV, **({"AUTORESEARCH_WORKER": worker} if worker else {}),
           **({"AUTORESEARCH_WORKER_LIFE": life} if life else {})}
    return subprocess.run([sys.executable, "analyze.py", *args], cwd=cwd, env=env, capture_output=True, text=True)


def edit_and_commit(tree: Path, old: str, new: str, message: str):
    source = (tree / "train.py").read_text()
    assert old in source
    (tree / "train.py").write_text(source.replace(old, new, 1))
    git(tree, "commit", "-qam", message)


def night_of_two(tmp_path, prepared):
    repo = night_repo(tmp_path / "repo")
    (repo / ".auto-log-research").mkdir()
    a, b = add_worktree(repo, "gpu0"), add_worktree(repo, "gpu1")
    for i, (tree, worker) in enumerate(((a, "gpu0"), (b, "gpu1"))):
        fake_run(tree, val_bpb=1.0 + 0.001 * i, seed=42 + i)
        assert analyze(tree, worker=worker).returncode == 0
        assert analyze(tree, "keep", worker=worker).returncode == 0
    return repo, a, b


def test_a_keep_in_one_worktree_is_the_best_every_other_worktree_builds_on(
        tmp_path, prepared, accept_synthetic):
    repo, a, b = night_of_two(tmp_path, prepared)
    edit_and_commit(a, "WEIGHT_DECAY = 0.2 ", "WEIGHT_DECAY = 0.1 ", "lower weight decay")
    for seed in (42, 43, 44):  # a clear gain, confirmed on 3 runs
        fake_run(a, val_bpb=0.9 - 0.0001 * (seed - 42), seed=seed)
        out = analyze(a, worker="gpu0")
        assert out.returncode == 0, out.stderr
    assert "verdict: KEEP" in out.stdout, out.stdout
    assert analyze(a, "keep", worker="gpu0").returncode == 0
    kept = (a / "train.py").read_text()

    # gpu1 started its idea on the old best; its own latest run is what discard acts on, not gpu0's
    edit_and_commit(b, "MATRIX_LR = 0.04 ", "MATRIX_LR = 0.05 ", "higher matrix lr")
    fake_run(b, val_bpb=1.2, seed=42)
    assert analyze(b, worker="gpu1").returncode == 0
    out = analyze(b, "discard", worker="gpu1")
    assert out.returncode == 0, out.stderr
    b_rows = [r for r in ledger(repo) if r["worker"] == "gpu1"]
    assert b_rows[-1]["status"] == "discard" and b_rows[-1]["description"] == "higher matrix lr"
    # ... and restores gpu0's kept train.py on gpu1's branch, with a commit there
    assert (b / "train.py").read_text() == kept
    assert git(b, "log", "-1", "--format=%s").startswith("revert to best ")
    assert git(b, "branch", "--show-current").strip() == "autoresearch/t-gpu1"
    assert git(a, "show", "HEAD:train.py") == kept  # gpu0's branch untouched by gpu1's discard


def test_sync_starts_a_worker_from_the_best_and_refuses_an_undecided_run(
        tmp_path, prepared, accept_synthetic):
    repo, a, b = night_of_two(tmp_path, prepared)
    edit_and_commit(a, "WEIGHT_DECAY = 0.2 ", "WEIGHT_DECAY = 0.1 ", "lower weight decay")
    fake_run(a, val_bpb=0.9, seed=42)
    assert analyze(a, worker="gpu0").returncode == 0
    assert analyze(a, "keep", worker="gpu0").returncode == 0  # kept on the agent's call
    out = analyze(b, "sync", worker="gpu1")
    assert out.returncode == 0, out.stderr
    assert "train.py synced to the best" in out.stdout
    assert (b / "train.py").read_text() == (a / "train.py").read_text()
    assert git(b, "log", "-1", "--format=%s").startswith("sync to best ")
    again = analyze(b, "sync", worker="gpu1")
    assert again.returncode == 0 and "nothing to do" in again.stdout

    edit_and_commit(b, "MATRIX_LR = 0.04 ", "MATRIX_LR = 0.05 ", "higher matrix lr")
    fake_run(b, val_bpb=0.95, seed=42)
    assert analyze(b, worker="gpu1").returncode == 0
    refused = analyze(b, "sync", worker="gpu1")
    assert refused.returncode == 1 and "awaits its decision" in refused.stderr, refused.stderr
    assert "MATRIX_LR = 0.05" in (b / "train.py").read_text()


def test_two_workers_starting_the_same_code_in_the_same_second_are_two_runs(
        tmp_path, prepared, accept_synthetic):
    repo = night_repo(tmp_path / "repo")
    (repo / ".auto-log-research").mkdir()
    a, b = add_worktree(repo, "gpu0"), add_worktree(repo, "gpu1")
    stamp = "2026-12-01T02:00:00+0000"
    for i, (tree, worker) in enumerate(((a, "gpu0"), (b, "gpu1"))):
        fake_run(tree, val_bpb=1.0 + 0.001 * i, seed=42 + i, started_at=stamp)
        out = analyze(tree, worker=worker)
        assert out.returncode == 0 and "status pending" in out.stdout, out.stdout + out.stderr
    assert [(r["worker"], r["status"], r["val_bpb"]) for r in ledger(repo)] == [("gpu0", "pending", 1.0),
                                                                               ("gpu1", "pending", 1.001)]
    again = analyze(b, worker="gpu1")  # the same files a second time are still refused
    assert again.returncode == 1 and "already archived" in again.stderr


# ---------------------------------------------------------------------------
# Idea claims
# ---------------------------------------------------------------------------

LIFE_HOLDER = ("import sys, time\nfrom harness import proc\nheld = proc.hold_life(sys.argv[1])\n"
               "print('held', flush=True)\ntime.sleep(600)\n")


def life_of(store: Store, name: str) -> subprocess.Popen:
    """A process that holds the worker life `name` in `store`, as a worker's supervisor does."""
    holder = subprocess.Popen([sys.executable, "-c", LIFE_HOLDER, str(store.path(claims.LIVES_DIR) / name)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def alive_only(*lives):
    return lambda life: life in lives


def test_an_idea_is_matched_by_its_text_whatever_its_list_marker_and_emphasis():
    assert claims.idea_key("3. **Set** `MATRIX_LR` to 0.03.") == claims.idea_key("- set MATRIX_LR to   0.03")
    assert claims.idea_key("1) [ ] Longer warmdown") == "longer warmdown"
    with pytest.raises(HarnessError):
        claims.idea_key("2. lr")


def test_a_claim_is_refused_while_its_worker_lives_and_for_good_once_tested():
    alive = alive_only("gpu0-life", "gpu1-life")
    held, _ = claims.take([], "1. set MATRIX_LR to 0.03", "gpu0", "gpu0-life", alive, now="t0")
    with pytest.raises(claims.ClaimRefused, match="claimed by gpu0"):
        claims.take(held, "set matrix_lr to 0.03", "gpu1", "gpu1-life", alive, now="t1")
    again, _ = claims.take(held, "1. set MATRIX_LR to 0.03", "gpu0", "gpu0-life", alive, now="t2")  # its own
    assert [c["state"] for c in again] == ["claimed"]
    moved, notes = claims.take(again, "2. set SCALAR_LR to 0.4", "gpu0", "gpu0-life", alive, now="t3")
    assert [c["state"] for c in moved] == ["released", "claimed"] and "one idea at a time" in notes[0]
    tested, done = claims.finish(moved, "gpu0", "abc1234", "discard")
    assert done["key"] == "set scalar_lr to 0.4" and tested[-1]["state"] == "tested"
    with pytest.raises(claims.ClaimRefused, match="already tested by gpu0 \\(run abc1234, discard\\)"):
        claims.take(tested, "set SCALAR_LR to 0.4", "gpu1", "gpu1-life", alive)
    free, _ = claims.take(tested, "set MATRIX_LR to 0.03", "gpu1", "gpu1-life", alive)  # released: free again
    legacy = {**held[0], "pid": os.getpid()}  # a claim from before the lives: its night is over
    del legacy["life"]
    by_hand = {k: v for k, v in legacy.items() if k != "pid"}  # no worker named: held until released
    assert not claims.is_live(legacy, alive) and claims.is_live(by_hand, alive)
    assert free[-1]["worker"] == "gpu1"


def test_a_dead_workers_claim_is_free_and_the_listing_shows_every_idea(tmp_path, prepared):
    repo = night_repo(tmp_path / "repo")
    (repo / ".auto-log-research" / "notes").mkdir(parents=True)
    (repo / ".auto-log-research" / "notes" / "ideas_queue.md").write_text(
        "# Ideas queue\n\n1. set MATRIX_LR to 0.03\n2. set SCALAR_LR to 0.4\nsome prose, not an idea\n")
    store = Store(repo)
    gpu0, gpu1, gpu2 = (life_of(store, f"gpu{i}-life") for i in range(3))
    assert analyze(repo, "claim", "1. set MATRIX_LR to 0.03", worker="gpu0", life="gpu0-life").returncode == 0
    assert analyze(repo, "claim", "2. set SCALAR_LR to 0.4", worker="gpu2", life="gpu2-life").returncode == 0
    gpu0.kill()  # the OOM killer: no clean-up of its own; the kernel releases its life
    gpu0.wait()
    refused = analyze(repo, "claim", "2. set SCALAR_LR to 0.4", worker="gpu1", life="gpu1-life")
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: idea already claimed by gpu2 since ")
    listing = analyze(repo, "claims").stdout.splitlines()
    assert listing[0] == "[free] 1. set MATRIX_LR to 0.03"  # its worker is gone
    assert listing[1].startswith("[claimed by gpu2 since ") and listing[1].endswith("] 2. set SCALAR_LR to 0.4")
    assert len(listing) == 2
    taken = analyze(repo, "claim", "set MATRIX_LR to 0.03", worker="gpu1", life="gpu1-life")
    assert taken.returncode == 0, taken.stderr
    assert "released gpu0's claim on it: that worker is gone" in taken.stdout
    for holder in (gpu1, gpu2):
        holder.kill()
        holder.wait()


def test_a_worker_that_ends_has_its_claims_released_by_the_night(tmp_path, prepared):
    repo = night_repo(tmp_path / "repo")
    store = Store(repo)
    store.dir.mkdir()
    claims.write(store, claims.take([], "set MATRIX_LR to 0.03", "gpu1", "gpu1-life", alive_only("gpu1-life"))[0])
    sup = type("Sup", (), {"store": store, "repo": repo, "lines": [],
                           "status": lambda self, line: self.lines.append(line)})()
    night = workers.Workers(sup, [("gpu1", "1")], [])
    night.procs = {"gpu1": subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])}
    night.procs["gpu1"].wait()
    night.reap()
    assert night.ended == {"gpu1": 3}
    assert [c["state"] for c in claims.read(store)] == ["released"]
    assert sup.lines == ["worker gpu1 ended (exit code 3); released its claim on 1 idea(s)"]


# ---------------------------------------------------------------------------
# The lock under N writers, stop rules, the command line
# ---------------------------------------------------------------------------

WRITER = f"""
import os, subprocess, sys
sys.path[:0] = [{str(ROOT / "tests")!r}, {str(ROOT)!r}]
from repos import fake_run
from pathlib import Path
tree, n = Path.cwd(), int(sys.argv[1])
for i in range(n):
    fake_run(tree, val_bpb=1.0 + 0.01 * i, seed=100 + i)
    proc = subprocess.run([sys.executable, "analyze.py"], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr)
"""


def test_three_worktrees_writing_at_once_lose_and_duplicate_no_row(
        tmp_path, prepared, accept_synthetic):
    repo = night_repo(tmp_path / "repo")
    (repo / ".auto-log-research").mkdir()
    trees = [add_worktree(repo, f"gpu{i}") for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, "4"], cwd=tree, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **GIT_ENV, "AUTORESEARCH_WORKER": f"gpu{i}"})
             for i, tree in enumerate(trees)]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err
    rows = ledger(repo)
    assert sorted(r["worker"] for r in rows) == sorted(["gpu0", "gpu1", "gpu2"] * 4)
    assert len({r["run_id"] for r in rows}) == 12
    tsv = (repo / ".auto-log-research" / "results.tsv").read_text().splitlines()
    assert len(tsv) == 13 and tsv[0].endswith("\tworker")


def test_crashes_in_a_row_stop_their_worker_and_every_other_rule_counts_the_night():
    stop_rules = rules.StopRules(max_experiments=10, max_consecutive_crashes=2)
    runs = [{"status": "crash", "worker": "gpu1"}, {"status": "discard", "worker": "gpu0"},
            {"status": "crash", "worker": "gpu1"}]
    own0 = [r for r in runs if r["worker"] == "gpu0"]
    own1 = [r for r in runs if r["worker"] == "gpu1"]
    assert rules.stop_reason(runs, stop_rules, 0, 0, own0) is None
    assert rules.stop_reason(runs, stop_rules, 0, 0, own1).startswith("2 crashes in a row")
    assert rules.stop_reason(runs, stop_rules, 0, 0) is None  # the only agent: its rows are the night's
    budget = rules.StopRules(max_experiments=3)
    assert rules.stop_reason(runs, budget, 0, 0, own0) == "experiment budget used (3 runs)"


def test_a_worker_gets_the_nights_options_less_the_ones_that_make_it_a_night_of_workers():
    argv = ["--backend", "claude", "--gpus", "0,1", "--tag=dec01", "--hours", "8", "--workers", "2", "--launcher", "slurm"]
    assert workers.worker_argv(argv) == ["--backend", "claude", "--hours", "8", "--launcher", "slurm"]


@pytest.mark.parametrize("gpus", ["", "0,0", "a,b"])
def test_a_bad_gpu_list_is_one_error_line(tmp_path, gpus):
    proc = subprocess.run([sys.executable, str(ROOT / "supervise.py"), "--backend", "claude", "--gpus", gpus],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: --gpus {gpus!r} is not a list of distinct")
