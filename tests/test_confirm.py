"""The end-of-night confirmation (night/confirm.py, issue 21 item 6): which codes it confirms, on
which seeds, and a real tiny CPU night whose last stretch runs the best and the night's starting
baseline again, with the result in the store, status.log, `analyze.py status` and report.html."""

import html
import json
import re
import statistics
import sys
import time
import types

import pytest

from analysis import confirmation
from analysis.store import Store
from conftest import ROOT, run_script
from harness import box, settings
from night import confirm
from repos import HARNESS, analyze, baseline, fake_run, git, make_repo
from test_night import night, status_lines  # noqa: F401  (the night fixture: a stand-in claude)


def row(run_id, code, status="ok", val=1.0, seed=42, **extra):
    """A ledger row as analyze.py writes it, of the fields the confirmation reads."""
    return {"run_id": run_id, "train_sha256": code, "commit": f"c-{code}", "status": status,
            "val_bpb": val, "seed": seed, "device": "cpu", "time_budget_s": 3,
            "harness_hash": "h", "data_fingerprint": "d", "torch_version": "2.15.0", **extra}


def test_the_stretch_is_the_default_only_in_a_night_four_times_as_long():
    assert confirm.stretch_minutes(8, None, False) == (28, None)
    assert confirm.stretch_minutes(112 / 60, None, False) == (28, None)
    assert confirm.stretch_minutes(1.85, None, False) == (0, (
        "no confirmation stretch: a 1.85 h night is too short for the default 28 minutes "
        "(--confirm-minutes M sets one)"))
    assert confirm.stretch_minutes(1, 10, False) == (10, None)
    assert confirm.stretch_minutes(None, 10, False) == (
        0, "no confirmation stretch: no deadline (--hours)")
    assert confirm.stretch_minutes(8, None, True) == (0, None)
    assert confirm.stretch_minutes(8, 20, True) == (
        0, "no confirmation stretch: a night of several workers")


def test_the_plan_confirms_the_best_against_the_best_the_night_started_from():
    ledger = [row("r1", "base", status="keep", val=1.0, seed=42),
              row("r2", "base", status="keep", val=1.002, seed=43),
              row("r3", "a", status="keep", val=0.99, seed=42),   # the best at the night's start
              row("r4", "b", status="discard", val=1.01, seed=44),
              row("r5", "c", status="keep", val=0.97, seed=42),   # the night's best
              row("r6", "d", status="crash", val=None, seed=57)]
    (best, start), why = confirm.plan(ledger, start_rows=3)
    assert why is None
    assert [r["run_id"] for r in best] == ["r5"] and [r["run_id"] for r in start] == ["r3"]
    assert confirm.fresh_seeds(ledger, 2) == [58, 59]


def test_a_night_on_an_empty_store_confirms_against_its_own_first_keep():
    ledger = [row("r1", "base", status="keep", val=1.0), row("r2", "c", status="keep", val=0.9)]
    (best, start), _ = confirm.plan(ledger, start_rows=0)
    assert [r["run_id"] for r in best] == ["r2"] and [r["run_id"] for r in start] == ["r1"]


@pytest.mark.parametrize("ledger, start_rows, why", [
    ([], 0, "nothing was kept: there is no best to confirm"),
    ([row("r1", "base", status="keep"), row("r2", "c", status="discard", val=1.1)], 1,
     "the best is still the code the night started from: no gain to confirm"),
])
def test_nothing_to_confirm_says_why(ledger, start_rows, why):
    assert confirm.plan(ledger, start_rows) == (None, why)


def test_the_last_stretch_runs_the_best_and_the_starting_baseline_on_fresh_seeds(
        prepared, night, tmp_path):
    """A real night: the store starts with a kept baseline (3 seeds); the stand-in agent commits an
    idea, whose run is kept; from the stretch on, the supervisor ends the agent and trains both
    codes for real (tiny CPU runs) under SEEDs 45 and 46, untouched ledger, the result reported."""
    repo, calls, start = night
    baseline(repo)  # seeds 42, 43, 44: kept before the night
    idea = (f"sed -i 's/^MATRIX_LR = 0.04 /MATRIX_LR = 0.044 /' train.py && "
            f"git commit -qam 'idea: MATRIX_LR 0.044'")
    plan = [[{"sh": idea}, {"sh": "make_run 0.95"},
             {"sh": f"{sys.executable} analyze.py keep"}, {"sleep": 600}]]
    # the stretch starts 120 s in: the agent's run is written by then, even on a loaded machine,
    # and its keep done or awaited (the stop's grace)
    proc = start(plan, "--hours", "0.3", "--confirm-minutes", str(0.3 * 60 - 2),
                 env={"AUTORESEARCH_TIME_BUDGET": "3"})
    out, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, out
    rows = Store(repo).read_ledger()
    assert [r["status"] for r in rows] == ["keep"] * 4  # nothing of the confirmation in it
    record = json.loads((repo / ".auto-log-research" / "confirmation.json").read_text())
    assert record["seeds"] == [45, 46]
    assert record["best"]["run_ids"] == [rows[3]["run_id"]]
    assert record["baseline"]["run_ids"] == [r["run_id"] for r in rows[:3]]
    assert record["best"]["commit"] == rows[3]["commit"] != rows[0]["commit"]
    runs = record["runs"]
    assert [(r["code"], r["seed"], r["status"]) for r in runs] == [
        ("best", 45, "ok"), ("baseline", 45, "ok"), ("best", 46, "ok"), ("baseline", 46, "ok")]
    assert all(2.0 < r["val_bpb"] < 10.0 for r in runs), runs  # real runs of the tiny model
    gains = [runs[1]["val_bpb"] - runs[0]["val_bpb"], runs[3]["val_bpb"] - runs[2]["val_bpb"]]
    result = record["result"]
    assert result["n"] == 2 and result["seeds"] == [45, 46]
    assert result["estimate"] == pytest.approx(statistics.mean(gains), abs=1e-12)
    assert result["survived"] == (statistics.mean(gains) > 0)
    assert record["in_night_gain"] == pytest.approx(1.0 - 0.95, abs=1e-9)
    line = confirmation.describe(record)
    assert line.startswith(f"confirmation: gain {statistics.mean(gains) * 1000:+.2f} mbpb")
    assert "in-night gain +50.00 mbpb" in line
    status = status_lines(repo)
    assert any("stopped: confirmation stretch from" in s for s in status), status
    assert line in status[-2], status[-2:]
    # the repository: the best's train.py, committed, and no worktree left
    assert "MATRIX_LR = 0.044 " in (repo / "train.py").read_text()
    assert git(repo, "status", "--porcelain").strip() == ""
    assert not (repo / ".worktrees" / "confirm").exists()
    assert "confirm" not in git(repo, "worktree", "list")
    assert line in analyze(repo, "status").stdout
    assert line in html.unescape((repo / ".auto-log-research" / "report.html").read_text())


# Put at the top of the idea's train.py: what it can change from where the confirmation trains it.
LOOK = r"""import json as _json, os as _os
def _look(ledger):
    tried = {}
    seals = _os.path.join(_os.environ['AUTORESEARCH_CACHE'], 'seals', 'forged.json')
    for target in (ledger, seals, 'harness/metric.py'):
        try:
            open(target, 'a').close()
            tried[target.split('/')[-1]] = 'written'
        except OSError:
            tried[target.split('/')[-1]] = 'refused'
    print('LOOK ' + _json.dumps({'tried': tried, 'seed': _os.environ.get('SEED')}), flush=True)
_look(%r)
"""


@pytest.mark.skipif(box.unavailable() is not None,
                    reason=f"no bubblewrap box here ({box.unavailable()}); .ci/run installs it")
def test_the_confirmation_trains_the_agents_code_in_its_box(prepared, accept_synthetic, tmp_path,
                                                            monkeypatch):
    """Where the night's agent was boxed, the best's train.py (the agent's code) trains in the
    train box: it cannot write the night's ledger, the seals or the harness, and gets its fresh
    SEED."""
    monkeypatch.setenv(settings.TIME_BUDGET_ENV, "3")
    monkeypatch.setattr(confirm, "CONFIRM_RUNS", 2)  # one pair: the box is under test, not pairing
    repo = make_repo(tmp_path / "repo", HARNESS)
    baseline(repo)
    ledger = repo / ".auto-log-research" / "runs.jsonl"  # the night's ledger, outside the worktree
    (repo / "train.py").write_text(LOOK % str(ledger) + (repo / "train.py").read_text())
    git(repo, "commit", "-qam", "idea: looks around first")
    fake_run(repo, 0.95, seed=42)
    assert analyze(repo).returncode == 0 and analyze(repo, "keep").returncode == 0
    said, logged = [], []
    sup = types.SimpleNamespace(
        repo=repo, store=Store(repo), started=time.time(), start_rows=3, night="test-night",
        _ledger=Store(repo).read_ledger, status=said.append, write_log=logged.append,
        args=types.SimpleNamespace(pass_env=set(), train_timeout=600), unboxed=None,
        rules=types.SimpleNamespace(deadline=None), immediate=False)
    record = confirm.Confirmation(sup).run()
    assert [(r["code"], r["seed"], r["status"]) for r in record["runs"]] == [
        ("best", 45, "ok"), ("baseline", 45, "ok")], record["runs"]
    looks = [json.loads(line[len("LOOK "):]) for text in logged for line in text.splitlines()
             if line.startswith("LOOK ")]
    assert looks == [{"tried": {"runs.jsonl": "refused", "forged.json": "refused",
                                "metric.py": "refused"}, "seed": "45"}]
    assert not (settings.CACHE_DIR / "seals" / "forged.json").exists()
    assert record["result"]["n"] == 1 and said[-1] == confirmation.describe(record)


def test_a_pair_starts_only_while_the_deadline_leaves_room_for_it(tmp_path):
    """With less left before the deadline than two of the codes' runs took, nothing is started:
    the record says so, with no result (the night's own runs took 400 s, 100 s are left)."""
    ledger = [row("r1", "base", status="keep", total_seconds=400.0),
              row("r2", "c", status="keep", val=0.9, total_seconds=400.0)]
    said = []
    repo = tmp_path / "repo"
    repo.mkdir()
    sup = types.SimpleNamespace(
        repo=repo, store=Store(repo), started=time.time(), start_rows=1, night="test-night",
        _ledger=lambda: ledger, status=said.append, write_log=said.append,
        args=types.SimpleNamespace(pass_env=set(), train_timeout=600), unboxed="test",
        rules=types.SimpleNamespace(deadline=time.time() + 100), immediate=False)
    Store(repo).dir.mkdir()
    git(repo, "init", "-q")
    git(repo, "commit", "-q", "--allow-empty", "-m", "empty")
    record = confirm.Confirmation(sup).run()
    assert record["runs"] == [] and record["result"] is None
    assert re.fullmatch(r"confirmation: (99|100) s left before the deadline, a pair takes ~800 s: "
                        r"no more pairs", said[1]), said
    assert said[-1] == confirmation.describe(record) == (
        "confirmation: no pair of runs finished (in-night gain +100.00 mbpb; the night of "
        f"{record['night_started_at']})")
    assert not (repo / ".worktrees" / "confirm").exists()


@pytest.mark.parametrize("args, line", [
    (["--hours", "1", "--confirm-minutes", "60"],
     "error: --confirm-minutes 60 must be shorter than the night (--hours 1: 60 minutes)"),
    (["--confirm-minutes", "-1"], "error: --confirm-minutes -1 must be at least 0"),
])
def test_a_stretch_that_does_not_fit_the_night_is_refused_in_one_line(args, line, tmp_path):
    done = run_script(["supervise.py", "--backend", "api", *args], cwd=ROOT)
    assert (done.returncode, done.stderr) == (2, line + "\n")
