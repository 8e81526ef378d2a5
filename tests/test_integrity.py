"""Metric integrity (analysis/integrity.py): each check on planted inputs, then analyze.py end to end
on a run whose evaluation was touched (invalid, loud, never kept) and on a clean run (no false alarm)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import contract, fixed, settings
import synthetic
from analysis import integrity, verdict
from conftest import ROOT
from repos import analyze, fake_run, git, head, ledger

EVAL_LINE = "    return nats / (math.log(2) * nbytes), nats / ntokens"
METRIC = "harness/metric.py"
HALVED_EVAL = "    return 0.5 * nats / (math.log(2) * nbytes), nats / ntokens"


def make_cache(folder, val_bytes=3 << 20):
    """A prepare cache as prepare.py leaves it (tokenizer, token bytes, a val file over several hash
    chunks, manifest.json with their sha256 and its content hash); returns the manifest."""
    files = {"tokenizer/tokenizer.pkl": os.urandom(50_000), "tokenizer/token_bytes.npy": os.urandom(8_192),
             "data/val.parquet": os.urandom(val_bytes), "data/train.parquet": os.urandom(10_000)}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    sha = {rel: contract.sha256_file(folder / rel) for rel in files}
    manifest = {"source": "offline", "smoke_test": True, "vocab_size": 1024,
                "tokenizer_sha256": sha["tokenizer/tokenizer.pkl"],
                "token_bytes_sha256": sha["tokenizer/token_bytes.npy"],
                "train_files": [{"path": "data/train.parquet", "sha256": sha["data/train.parquet"]}],
                "val_files": [{"path": "data/val.parquet", "sha256": sha["data/val.parquet"]}]}
    manifest["manifest_hash"] = contract.manifest_hash(manifest)
    manifest["created"] = "2026-11-22T10:00:00+0000"
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def summary_on(manifest, **kw):
    records = synthetic.make_records(n_steps=50)
    data = {"source": manifest["source"], "smoke_test": True, "manifest_hash": manifest["manifest_hash"]}
    return records, synthetic.make_summary(records, 1.0, data=data, **kw)


def flip_byte(path, at=-1):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------
# Each check on planted inputs
# ---------------------------------------------------------------------------

def test_prepared_cache_passes(tmp_path):
    _, summary = summary_on(make_cache(tmp_path))
    assert integrity.data_problems(summary, tmp_path, None) == []


@pytest.mark.parametrize("rel", ["tokenizer/token_bytes.npy", "tokenizer/tokenizer.pkl", "data/val.parquet"])
def test_tampered_tokenizer_or_val_file_is_found(tmp_path, rel):
    _, summary = summary_on(make_cache(tmp_path))
    flip_byte(tmp_path / rel, at=(2 << 20) + 5 if rel == "data/val.parquet" else -1)  # val: inside the 3rd MiB chunk
    problems = integrity.data_problems(summary, tmp_path, None)
    assert len(problems) == 1 and rel in problems[0] and "prepare.py wrote" in problems[0]
    (tmp_path / rel).unlink()
    assert "is missing" in integrity.data_problems(summary, tmp_path, None)[0]


def test_edited_manifest_is_found(tmp_path):
    manifest = make_cache(tmp_path)
    _, summary = summary_on(manifest)
    flip_byte(tmp_path / "data/val.parquet")
    manifest["val_files"][0]["sha256"] = contract.sha256_file(tmp_path / "data/val.parquet")  # "bless" the tampered file
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    problems = integrity.data_problems(summary, tmp_path, None)
    assert len(problems) == 1 and "was edited after prepare.py wrote it" in problems[0]


def test_data_other_than_the_runs_or_the_first_runs_is_found(tmp_path):
    manifest = make_cache(tmp_path)
    _, summary = summary_on(manifest)
    other = {**summary, "data": {**summary["data"], "manifest_hash": "feedfacefeedface"}}
    problems = integrity.data_problems(other, tmp_path, None)
    assert len(problems) == 1 and "feedfacefeedface" in problems[0] and "prepared again" in problems[0]
    first = {"run_id": "abc1234", "data": {"manifest_hash": "0badc0de0badc0de"}}
    problems = integrity.data_problems(summary, tmp_path, first)
    assert len(problems) == 1 and "first run abc1234" in problems[0] and "0badc0de0badc0de" in problems[0]


def test_missing_manifest_is_a_problem_only_for_a_run_that_claims_data(tmp_path):
    manifest = make_cache(tmp_path)
    _, summary = summary_on(manifest)
    (tmp_path / "manifest.json").unlink()
    problems = integrity.data_problems(summary, tmp_path, None)
    assert len(problems) == 1 and "manifest.json is missing" in problems[0]
    no_data = {**summary, "data": {"error": "no prepared data"}}
    assert integrity.data_problems(no_data, tmp_path, None) == []


def test_harness_hash_is_defined_once_and_checked():
    summary = synthetic.make_summary(synthetic.make_records(n_steps=20), 1.0)
    assert integrity.harness_hash_problems(summary, ROOT) == []
    problems = integrity.harness_hash_problems({**summary, "harness_hash": "0123456789abcdef"}, ROOT)
    assert len(problems) == 1 and "0123456789abcdef" in problems[0] and contract.harness_hash(ROOT) in problems[0]


def test_manifest_hash_is_defined_once(prepared):
    assert contract.manifest_hash(prepared) == prepared["manifest_hash"]
    on_disk = json.loads((contract.cache_path(contract.MANIFEST)).read_text())
    assert contract.manifest_hash(on_disk) == on_disk["manifest_hash"] == prepared["manifest_hash"]


def test_training_time_must_match_the_step_times():
    records = synthetic.make_records(n_steps=200)
    summary = synthetic.make_summary(records, 1.0)
    assert integrity.clock_problems(summary, records, None) == []
    doubled = {**summary, "training_seconds": 2 * summary["training_seconds"]}
    problems = integrity.clock_problems(doubled, records, None)
    assert len(problems) == 2  # against the sum of step times and against the last record's clock
    assert "sum of the run's own step times" in problems[0] and f"{summary['training_seconds']:.1f} s" in problems[0]
    assert "last metrics record" in problems[1]
    # inside the tolerance: rounding, or a loop timed slightly differently, is no alarm
    nudged = {**summary, "training_seconds": summary["training_seconds"] * (1 + integrity.CLOCK_REL_TOLERANCE / 2)}
    assert integrity.clock_problems(nudged, records, None) == []
    # the clock-warmup steps are off the clock: counting them would be a (false) mismatch
    assert integrity.clock_problems({**summary, "config": {}}, records, None) == []
    assert integrity.clock_problems({**summary, "status": "crash"}, records, None) == []
    assert integrity.clock_problems(summary, [], None) == []


def test_compute_moved_off_the_clock_by_more_warmup_steps_is_found():
    records = synthetic.make_records(n_steps=50)
    first = {"run_id": "base", "device": "cpu", "time_budget_s": 300.0, "config": {"CLOCK_WARMUP_STEPS": 2}}
    summary = synthetic.make_summary(records, 1.0, device="cpu", config={"CLOCK_WARMUP_STEPS": 2})
    assert integrity.clock_problems(summary, records, first) == []
    more = synthetic.make_summary(records, 1.0, device="cpu", config={"CLOCK_WARMUP_STEPS": 20})
    problems = [p for p in integrity.clock_problems(more, records, first) if "CLOCK_WARMUP_STEPS" in p]
    assert problems == ["CLOCK_WARMUP_STEPS 20 differs from the first run base's 2 on this device: steps kept off "
                        "the training clock are compute for free; set CLOCK_WARMUP_STEPS = 2 in train.py and train again"]
    elsewhere = synthetic.make_summary(records, 1.0, device="NVIDIA H100 80GB HBM3", config={"CLOCK_WARMUP_STEPS": 3})
    assert not [p for p in integrity.clock_problems(elsewhere, records, first) if "CLOCK_WARMUP_STEPS" in p]


def test_time_off_the_training_clock_is_bounded_by_the_reference_run_on_the_device():
    def run(run_id, train_process_s, device="cpu"):  # 100 s trained, a final evaluation of 10 s
        return {"run_id": run_id, "status": "ok", "device": device, "training_seconds": 100.0,
                "evaluator": {"seconds": 10.0, "train_process_s": train_process_s}}

    reference = run("base", 150.0)  # 40 s off the clock: the bound is 1.5 x 40 + 30 = 90 s
    assert integrity.untimed_problems(run("next", 200.0), reference) == []  # 90 s: at the bound
    assert integrity.untimed_problems(run("next", 201.0), reference) == [
        "train.py ran 91.0 s off the training clock (startup, compilation, warm-up steps, "
        "validation points), more than the bound of 90.0 s (1.5 x the 40.0 s of the reference "
        "run base on this device + 30 s): that is time to train before the clock starts; move "
        "the work into the timed loop (or out of train.py) and train again"]
    assert integrity.untimed_problems({**run("next", 900.0), "status": "crash"}, reference) == []
    assert integrity.untimed_problems(run("next", 900.0), None) == []  # the device's first run
    legacy = {**reference, "evaluator": {"seconds": 10.0}}  # before launch.py measured train.py
    assert integrity.untimed_problems(run("next", 900.0), legacy) == []


def test_training_past_the_budget_or_on_another_budget_is_found():
    records = synthetic.make_records(n_steps=200)  # about 60 s of timed steps
    summary = synthetic.make_summary(records, 1.0, budget_s=30.0)
    problems = integrity.clock_problems(summary, records, None)
    assert len(problems) == 1 and "exceeds the time budget of 30 s" in problems[0]
    # the loop stops after the step that crosses the budget: that much past it is honest
    just_over = synthetic.make_summary(records, 1.0, budget_s=summary["training_seconds"] - 0.2)
    assert integrity.clock_problems(just_over, records, None) == []
    first = {"run_id": "abc1234", "time_budget_s": 600.0}
    problems = integrity.clock_problems(synthetic.make_summary(records, 1.0), records, first)
    assert len(problems) == 1 and "time_budget_s 300.0 differs from the first run abc1234's 600.0" in problems[0]


def test_harness_git_check(repo, tmp_path_factory):
    assert integrity.harness_git_problems(tmp_path_factory.mktemp("not_a_repo"), None) == []
    first = {"run_id": head(repo), "commit": head(repo)}
    assert integrity.harness_git_problems(repo, first) == []
    (repo / "train.py").write_text((repo / "train.py").read_text() + "\n# the agent's file\n")
    assert integrity.harness_git_problems(repo, first) == []
    (repo / "analysis" / "helper.py").write_text("X = 1\n")
    problems = integrity.harness_git_problems(repo, first)
    assert problems == [f"analysis/helper.py is a new, uncommitted harness file: {integrity.RESTORE_HINT}; "
                        f"remove it (rm analysis/helper.py)"]
    (repo / "analysis" / "helper.py").unlink()
    (repo / "analysis" / "stats.py").write_text((repo / "analysis" / "stats.py").read_text() + "\n")
    git(repo, "commit", "-qam", "tweak the statistics")
    problems = integrity.harness_git_problems(repo, first)
    assert len(problems) == 1 and problems[0].startswith(f"analysis/stats.py changed since commit {first['commit']}")
    assert f"git checkout {first['commit']} -- analysis/stats.py" in problems[0]
    problems = integrity.harness_git_problems(repo, {"run_id": "x", "commit": "deadbee"})
    assert len(problems) == 1 and "cannot compare the harness with commit deadbee" in problems[0]


def hidden(repo) -> str:
    """What git status shows of the fixed files: nothing, for an edit hidden from it."""
    return git(repo, "status", "--porcelain", "--untracked-files=all", "--", *contract.FIXED_PATHSPECS)


@pytest.mark.parametrize("flag", ["--assume-unchanged", "--skip-worktree"])
def test_an_edit_hidden_from_git_status_is_found_by_its_content(repo, flag):
    first = {"run_id": head(repo), "commit": head(repo)}
    git(repo, "update-index", flag, METRIC)
    halve_the_metric(repo)
    assert hidden(repo) == ""  # the attack works on git status
    assert integrity.harness_git_problems(repo, first) == [
        f"{METRIC} has uncommitted changes: {integrity.RESTORE_HINT}; restore it with `git update-index "
        f"--no-assume-unchanged --no-skip-worktree {METRIC} && git checkout -- {METRIC}`"]
    (repo / METRIC).unlink()
    assert integrity.harness_git_problems(repo, first) == [
        f"{METRIC} is missing: {integrity.RESTORE_HINT}; restore it with `git checkout -- {METRIC}`"]


def test_a_new_harness_file_ignored_by_git_is_found(repo):
    first = {"run_id": head(repo), "commit": head(repo)}
    with open(repo / ".git" / "info" / "exclude", "a") as f:
        f.write("harness/faster.py\nnight/\n")
    (repo / "harness" / "faster.py").write_text("SCALE = 0.5\n")
    assert hidden(repo) == ""
    assert integrity.harness_git_problems(repo, first) == [
        f"harness/faster.py is a new, uncommitted harness file: {integrity.RESTORE_HINT}; remove it "
        f"(rm harness/faster.py)"]


def test_bytecode_python_loads_instead_of_its_source_is_found(repo):
    """A .pyc of an edited source, with the header of the honest one: git ignores __pycache__, every
    diff shows nothing, and Python runs the edit."""
    import py_compile
    first = {"run_id": head(repo), "commit": head(repo)}
    source = repo / "harness" / "contract.py"
    honest, stat = source.read_bytes(), source.stat()
    for name in ("contract.py", "settings.py", "__init__.py"):  # honest bytecode: no alarm
        py_compile.compile(str(repo / "harness" / name), doraise=True)
    assert integrity.harness_git_problems(repo, first) == []
    source.write_bytes(honest.replace(b"HASH_CHUNK_BYTES = 1 << 20", b"HASH_CHUNK_BYTES = 1 << 21"))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same size and mtime
    pyc = py_compile.compile(str(source), doraise=True)
    source.write_bytes(honest)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert hidden(repo) == ""
    loaded = subprocess.run([sys.executable, "-c", "from harness import contract; print(contract.HASH_CHUNK_BYTES)"],
                            cwd=repo, capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == str(1 << 21)  # the attack works: Python runs the bytecode
    rel = Path(pyc).relative_to(repo).as_posix()
    assert integrity.harness_git_problems(repo, first) == [
        f"{rel} is compiled bytecode that Python loads instead of its source but holds other code: "
        f"{integrity.RESTORE_HINT}; remove it (rm {rel})"]


CHECKER_EDITS = {  # each silences the integrity check of a committed edit of the evaluation today
    "analysis/integrity.py": ("    repo_root = Path(repo_root)\n    seal = ", "    return []\n"),  # no problem found
    "analysis/verdict.py": ('    return record.get("status") not in NOT_COUNTED', "    return False and"),  # no first run
}


@pytest.mark.parametrize("checker", CHECKER_EDITS)
def test_a_committed_change_of_the_checker_itself_is_refused(accept_synthetic, repo, checker):
    """`return []` at the top of integrity_problems, or a `finished` that never finds the first run,
    committed: analyze.py compares its checker's own files with the first run's commit (found without
    analysis/) before it judges anything."""
    fake_run(repo, 1.0)
    assert analyze(repo).returncode == 0 and analyze(repo, "keep").returncode == 0
    first = head(repo)
    line, inserted = CHECKER_EDITS[checker]
    source = (repo / checker).read_text()
    assert source.count(line) == 1
    (repo / checker).write_text(source.replace(line, inserted + line if inserted.endswith("\n")
                                               else line.replace("    return", inserted, 1)))
    git(repo, "commit", "-qam", "faster analysis")
    halve_the_metric(repo)
    git(repo, "commit", "-qam", "faster evaluation")
    fake_run(repo, 0.5, seed=1, harness_hash=contract.harness_hash(repo))
    proc = analyze(repo)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"error: {checker} differs from commit {first} of the store's first run: the integrity "
        f"check itself is off limits; restore it with `git checkout {first} -- {checker}` and "
        f"commit, then run the command again")
    assert [r["val_bpb"] for r in ledger(repo)] == [1.0]
    assert analyze(repo, "keep").returncode == 1


def test_the_checks_restated_without_analysis_agree_with_it():
    """harness/fixed.py finds the first run without analysis/ (whose edit it checks): the same ledger,
    the same notion of a finished run."""
    from analysis import store
    assert fixed.LEDGER_FILE == f"{store.STORE_DIR}/{store.RUNS_JSONL}"
    assert fixed.NOT_FINISHED == verdict.NOT_COUNTED


def test_decide_discards_an_invalid_run_loudly():
    decision = verdict.decide([], failed="invalid")
    assert decision["verdict"] == "discard" and decision["reason"].startswith("INVALID")
    assert not verdict.finished({"status": "invalid", "val_bpb": 0.5})


# ---------------------------------------------------------------------------
# analyze.py end to end
# ---------------------------------------------------------------------------

def halve_the_metric(repo):
    source = (repo / METRIC).read_text()
    assert source.count(EVAL_LINE) == 1
    (repo / METRIC).write_text(source.replace(EVAL_LINE, HALVED_EVAL))


def assert_invalid(repo, proc, problem):
    assert proc.returncode == 0, proc.stderr
    entry = ledger(repo)[-1]
    assert entry["status"] == "invalid" and entry["verdict"] == "discard" and entry["val_bpb"] == 0.5
    assert any(problem in p for p in entry["integrity"]), entry["integrity"]
    assert f"INVALID: {entry['integrity'][0]}" in proc.stdout and "verdict: DISCARD — INVALID" in proc.stdout
    text = (repo / ".auto-log-research" / entry["run_id"] / "analysis.md").read_text()
    assert text.index("## Verdict") < text.index("## Integrity") < text.index("## Configuration vs best")
    for p in entry["integrity"]:
        assert f"- {p}" in text
    return entry


def test_an_uncommitted_edit_of_the_evaluation_makes_the_run_invalid(repo):
    halve_the_metric(repo)
    fake_run(repo, 0.5, harness_hash=contract.harness_hash(repo))  # what train.py records under the edited harness
    entry = assert_invalid(repo, analyze(repo), f"{METRIC} has uncommitted changes")
    assert f"git checkout -- {METRIC}" in entry["integrity"][0]
    proc = analyze(repo, "keep")
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    git(repo, "checkout", "--", METRIC)
    proc = analyze(repo, "keep", entry["run_id"])
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"error: run {entry['run_id']} is invalid and can never be kept: {METRIC}")
    assert ledger(repo)[-1]["status"] == "invalid"


def test_a_committed_edit_of_the_evaluation_is_caught_and_never_becomes_the_best(accept_synthetic, repo):
    fake_run(repo, 1.0)
    proc = analyze(repo)
    assert proc.returncode == 0 and ledger(repo)[0]["integrity"] == [] and "INVALID" not in proc.stdout
    assert analyze(repo, "keep").returncode == 0
    first = head(repo)
    halve_the_metric(repo)
    git(repo, "commit", "-qam", "faster evaluation")
    fake_run(repo, 0.5, seed=1, harness_hash=contract.harness_hash(repo))
    invalid = assert_invalid(repo, analyze(repo), f"{METRIC} changed since commit {first}")
    proc = analyze(repo, "keep")
    assert proc.returncode != 0 and "is invalid and can never be kept" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    status = analyze(repo, "status").stdout
    assert f"best: {first} val_bpb 1.000000" in status and "1 invalid" in status
    # the harness restored, a clean run of new code is judged normally again
    git(repo, "checkout", first, "--", METRIC)
    git(repo, "commit", "-qam", "restore the harness")
    fake_run(repo, 1.001, seed=2)
    proc = analyze(repo)
    entry = ledger(repo)[-1]
    assert entry["integrity"] == [] and entry["status"] in ("pending", "rerun") and "INVALID" not in proc.stdout
    assert f"vs previous {invalid['run_id']}: n/a (status invalid)" in proc.stdout  # no delta against a fake number


def test_a_run_that_claims_more_training_time_than_its_steps_is_invalid(repo):
    records, summary = fake_run(repo, 0.5)
    synthetic.write_run(repo, records, {**summary, "training_seconds": 2 * summary["training_seconds"]}, "log\n")
    assert_invalid(repo, analyze(repo), "disagrees with the sum of the run's own step times")


def test_tampered_validation_data_makes_the_run_invalid(accept_synthetic, repo, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    make_cache(cache)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))  # for the analyze.py process
    monkeypatch.setattr(settings, "CACHE_DIR", cache)  # for fake_run's summary, in this process
    fake_run(repo, 1.0)
    proc = analyze(repo)
    assert proc.returncode == 0 and ledger(repo)[-1]["integrity"] == [], proc.stdout
    flip_byte(cache / "data/val.parquet")
    fake_run(repo, 0.5, seed=1)
    assert_invalid(repo, analyze(repo), "data/val.parquet is not the file prepare.py wrote")


def test_synthetic_runs_pass_the_checks(repo):
    """No false alarm on the runs the other tests and the benchmark use."""
    records, summary = fake_run(repo, 1.0)
    assert integrity.integrity_problems(summary, records, repo, settings.CACHE_DIR, None) == []


def test_a_synthetic_run_is_invalid_unless_the_test_accepts_it(repo):
    """tests/synthetic.py's runs never trained: their seal names the helper, and analyze.py calls
    such a run invalid (never kept) unless AUTORESEARCH_ACCEPT_SYNTHETIC=1 says a test wrote it."""
    fake_run(repo, 0.5)
    entry = assert_invalid(repo, analyze(repo), "sealed by the tests' synthetic-run helper")
    assert entry["integrity"] == [
        "the run was sealed by the tests' synthetic-run helper (tests/synthetic.py), not by the "
        "harness's evaluator: it never trained; train with `uv run launch.py`"]
    proc = analyze(repo, "keep")
    assert proc.returncode != 0 and "is invalid and can never be kept" in proc.stderr


def test_a_seal_must_name_the_evaluator():
    assert integrity.sealer_problems("evaluator") == []
    assert integrity.sealer_problems(None) == [
        "the run's seal names None as its writer, not the harness's evaluator: train again with "
        "`uv run launch.py`"]
