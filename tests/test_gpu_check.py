"""bench/gpu_check.py, the GPU measurement as one command under a deadline, checked on CPU.

- The whole check end to end (real train.py runs, tiny budgets): a line per step, in order, each
  run with every figure, the summary against the targets.
- A deadline with room for the main run only: the pair and sdpa are skipped, saying why.
- Each line is in --out before the next run starts; a failed run leaves its error and the check
  goes on; a run past its time is killed. These use a stand-in train.py that writes a run's files
  at once (the check's logic is under test, not training).
- A prepare that fails ends the check with its error line; the offline wheel install.
"""

import json
import os
import subprocess
import sys
import time
import zipfile

import pytest

from conftest import ROOT, run_script
from harness import settings

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402
import train_variants  # noqa: E402

FIGURES = ("device", "torch", "mfu_percent", "tokens_per_s", "steps_per_s", "num_steps",
           "median_step_ms", "peak_vram_mb", "startup_seconds", "overhead_seconds",
           "wall_seconds", "val_bpb", "graph_breaks", "recompiles", "graphs_in_loop",
           "recompiles_in_loop")
TARGETS = {"mfu >= 40 %", "overhead <= 20 s", "peak VRAM <= 80 GB",
           "no graph break, nothing compiled on the clock", "evaluator <= 60 s", "instrumentation <= 1 %"}
ALL_STEPS = ["prepare", "main", "pair-instrumented", "pair-uninstrumented", "sdpa", "summary"]

# What the stand-in train.py writes: a finished run's summary and its one metrics line
STUB_SUMMARY = {"config": {"CLOCK_WARMUP_STEPS": 2, "TOTAL_BATCH_SIZE": 1024,
                           "ATTENTION_BACKEND": "sdpa", "DEVICE_BATCH_SIZE": 4},
                "num_steps": 3, "training_seconds": 1.0, "total_seconds": 1.5, "device": "stub",
                "torch_version": "stub", "mfu_percent": 0.0, "peak_vram_mb": 0.0,
                "startup_seconds": 0.1, "val_bpb": 1.0, "compile": {}}
STUB_METRICS = {"step": 2, "perf/step_time_ms": 100.0}
STUB = '''"""A stand-in train.py: notes what the check's --out holds, writes a run's files."""
import json, pathlib
if {out!r}:
    with open({log!r}, "a") as log:
        log.write(json.dumps(pathlib.Path({out!r}).read_text().splitlines()) + "\\n")
pathlib.Path("run_summary.json").write_text({summary!r})
pathlib.Path("metrics.jsonl").write_text({metrics!r} + "\\n")
'''
FAILING_STUB = 'import sys\nsys.exit("boom: this variant cannot run here")\n'
HANGING_STUB = "import time\ntime.sleep(3600)\n"


def stub_source(out=None, log=None) -> str:
    return STUB.format(out=str(out or ""), log=str(log or ""), summary=json.dumps(STUB_SUMMARY),
                       metrics=json.dumps(STUB_METRICS))


def write_stub_run(dest, source: str):
    """A run's folder as run_train copies it, with `source` as its train.py."""
    dest.mkdir(exist_ok=True)
    (dest / "harness").mkdir()
    (dest / "prepare.py").write_text("")
    (dest / "launch.py").write_text("import os, sys\nos.execv(sys.executable, [sys.executable, 'train.py'])\n")
    (dest / "train.py").write_text(source)
    return dest


@pytest.fixture
def stub_runs(monkeypatch):
    """Every run of an in-process check gets the train.py that sources[its name] (a variant, or a
    pairing code; else sources[None]) gives."""
    sources = {}
    monkeypatch.setattr(gpu_check, "write_variant", lambda dest, variant, *edits, **owner:
                        write_stub_run(dest, sources.get(dest.name, sources.get(None))))
    return sources


def check_lines(out):
    return [json.loads(line) for line in out.read_text().splitlines()]


def run_check(tmp_path, *args):
    out = tmp_path / "check.jsonl"
    code = gpu_check.main(["--cache", str(settings.CACHE_DIR), "--out", str(out), *args])
    assert code == 0
    return out, check_lines(out)


def test_gpu_check_runs_every_step_in_order_and_reports_every_figure(prepared, tmp_path):
    """The check end to end on CPU with real runs: the prepared cache is reused, one JSON line per
    step, in order, and the summary (the figures are CPU ones, not GPU results)."""
    out = tmp_path / "check.jsonl"
    proc = run_script(["bench/gpu_check.py", "--cache", str(settings.CACHE_DIR), "--budget", "2",
                       "--pair-budget", "1", "--deadline-s", "900", "--out", str(out)],
                      cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = check_lines(out)
    assert [line["step"] for line in lines] == ALL_STEPS
    assert proc.stdout.splitlines() == [json.dumps(line) for line in lines]
    assert lines[0]["reused"] is True
    runs = {line["step"]: line for line in lines[1:-1]}
    assert [r["variant"] for r in runs.values()] == ["instrumented", "instrumented",
                                                      "uninstrumented", "sdpa"]
    assert [r["budget_s"] for r in runs.values()] == [2, 1, 1, 1]
    for run in runs.values():
        assert "error" not in run, run
        assert all(key in run for key in FIGURES), set(FIGURES) - set(run)
        assert run["device"] == "cpu" and run["num_steps"] > 0 and run["median_step_ms"] > 0
    assert runs["pair-instrumented"]["val_points"] >= 1
    plain = runs["pair-uninstrumented"]  # its one metrics line, the last: no curve
    assert plain["val_points"] == 0 and plain["step_times_logged"] == 1
    summary = lines[-1]
    assert set(summary["steps"].values()) == {"ran"}
    assert summary["instrumentation_cost_percent"] is not None
    assert summary["sdpa_compared_with"] == "pair-instrumented"
    assert set(summary["targets"]) == TARGETS
    assert all(set(t) == {"value", "met"} for t in summary["targets"].values())
    assert summary["targets"]["instrumentation <= 1 %"]["value"] is not None


def test_a_deadline_with_room_for_the_main_run_only_skips_the_rest_saying_why(
        prepared, tmp_path, stub_runs):
    stub_runs[None] = stub_source()
    # the main run needs 1 s + the assumed overhead + the margin; each later run 300 s + more
    out, lines = run_check(tmp_path, "--budget", "1", "--pair-budget", "300", "--deadline-s", "300")
    assert [line["step"] for line in lines] == ["prepare", "main", "pair", "sdpa", "summary"]
    main, pair, sdpa, summary = lines[1:]
    assert main["variant"] == "instrumented" and all(key in main for key in FIGURES)
    for line in (pair, sdpa):
        assert line["skipped"] == line["step"]
        assert "300 s training" in line["why"] and "left before the deadline" in line["why"]
        assert line["needs_s"] > line["left_s"]
    assert summary["steps"] == {"main": "ran", "pair": "skipped", "sdpa": "skipped"}
    assert summary["targets"]["instrumentation <= 1 %"] == {"value": None, "met": None}


def test_a_run_is_expected_to_cost_what_its_codes_last_run_cost_else_the_largest_measured(
        tmp_path):
    """The first run of a code compiles it (~85 s on an H200), its later runs find the cache warm:
    a code's last run sets its expected overhead; a code not yet run expects the largest any run
    measured; before any run, the assumed one."""
    check = gpu_check.Check(tmp_path / "check.jsonl", time.monotonic(), deadline_s=200)
    assert check.overhead("a") == (gpu_check.ASSUMED_OVERHEAD_S, "assumed")
    check.overheads = {"a": [106.0, 30.0], "b": [25.0]}
    assert check.overhead("a") == (30.0, "measured by a's last run")
    assert check.overhead("b") == (25.0, "measured by b's last run")
    assert check.overhead("c") == (106.0, "measured")
    # 200 s left: one 100 s run of b fits (100 + 25 + the margin), of a new code it does not
    assert check.fits("b-run", 100, variant="b")
    assert not check.fits("c-run", 100, variant="c")
    check.close()
    (skipped,) = check_lines(tmp_path / "check.jsonl")
    assert skipped["step"] == "c-run" and "106 s overhead, measured)" in skipped["why"]


def test_each_line_is_in_the_out_file_before_the_next_run_starts(prepared, tmp_path, stub_runs):
    """Each stand-in run notes, as it starts, what --out holds already: every line before it."""
    seen = tmp_path / "seen.jsonl"
    stub_runs[None] = stub_source(out=tmp_path / "check.jsonl", log=seen)
    out, lines = run_check(tmp_path, "--budget", "1", "--pair-budget", "1")
    assert [line["step"] for line in lines] == ALL_STEPS
    at_start = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(at_start) == 4  # main, the pair, sdpa
    for held, index in zip(at_start, (1, 2, 3, 4)):
        assert [json.loads(line) for line in held] == lines[:index]


def test_a_failed_run_leaves_its_error_and_the_check_goes_on(prepared, tmp_path, stub_runs):
    stub_runs[None], stub_runs["uninstrumented"] = stub_source(), FAILING_STUB
    out, lines = run_check(tmp_path, "--budget", "1", "--pair-budget", "1")
    assert [line["step"] for line in lines] == ALL_STEPS
    failed = lines[3]
    assert failed["error"] == "train.py failed (exit 1)"
    assert "boom: this variant cannot run here" in failed["stderr_tail"]
    summary = lines[-1]
    assert summary["steps"]["pair-uninstrumented"] == "failed"
    assert summary["steps"]["sdpa"] == "ran"
    assert summary["instrumentation_cost_percent"] is None


SEEDED_STUB = '''"""A stand-in train.py whose val_bpb is VALUES[SEED]: one code under each seed."""
import json, os, pathlib
VALUES = {values!r}
summary = {{**json.loads({summary!r}), "val_bpb": VALUES[int(os.environ["SEED"])]}}
pathlib.Path("run_summary.json").write_text(json.dumps(summary))
pathlib.Path("metrics.jsonl").write_text({metrics!r} + "\\n")
'''


def seeded_stub(values: dict) -> str:
    return SEEDED_STUB.format(values=values, summary=json.dumps(STUB_SUMMARY),
                              metrics=json.dumps(STUB_METRICS))


def test_the_pairing_step_runs_both_codes_seed_by_seed_and_reports_rho(prepared, tmp_path,
                                                                       stub_runs):
    """`--steps pairing`: the baseline and the changed code under seeds 1..3, seed by seed, each
    run told its SEED; rho-hat from the three pairs, as computed here by hand."""
    base = {1: 1.000, 2: 1.020, 3: 1.010}
    changed = {1: 1.004, 2: 1.026, 3: 1.011}
    stub_runs[None] = stub_source()  # the variants the check writes, and never runs here
    stub_runs["pairing-baseline"] = seeded_stub(base)
    stub_runs["pairing-matrix_lr_x1.1"] = seeded_stub(changed)
    out, lines = run_check(tmp_path, "--steps", "pairing", "--pairing-seeds", "3",
                           "--pairing-budget", "1")
    runs = lines[1:-2]
    assert [(r["step"], r["seed"]) for r in runs] == [
        (f"pairing-{code}-seed{seed}", seed) for seed in (1, 2, 3)
        for code in ("baseline", "matrix_lr_x1.1")]
    assert [r["val_bpb"] for r in runs] == [1.000, 1.004, 1.020, 1.026, 1.010, 1.011]
    pairing, summary = lines[-2:]
    diff = [0.004, 0.006, 0.001]
    var = lambda xs: sum((x - sum(xs) / 3) ** 2 for x in xs) / 2  # noqa: E731
    rho = 1 - var(diff) / (var([1.0, 1.02, 1.01]) + var([1.004, 1.026, 1.011]))
    assert pairing["seeds_paired"] == [1, 2, 3]
    assert pairing["rho"] == pytest.approx(rho, abs=1e-9)
    assert pairing["rho_interval_95"][0] <= pairing["rho_interval_95"][1]
    assert summary["pairing_rho"] == pairing["rho"]
    assert summary["steps"] == {r["step"]: "ran" for r in runs}


def test_a_pairing_with_one_seed_finished_by_both_codes_says_why_it_has_no_rho(
        prepared, tmp_path, stub_runs):
    """The changed code fails under seed 2 (its stand-in knows no value for it): one pair."""
    stub_runs[None] = stub_source()
    stub_runs["pairing-baseline"] = seeded_stub({1: 1.0, 2: 1.01})
    stub_runs["pairing-matrix_lr_x1.1"] = seeded_stub({1: 1.002})
    out, lines = run_check(tmp_path, "--steps", "pairing", "--pairing-seeds", "2",
                           "--pairing-budget", "1")
    failed, pairing, summary = lines[-3:]
    assert failed["step"] == "pairing-matrix_lr_x1.1-seed2" and "KeyError: 2" in (
        failed["stderr_tail"])
    assert {k: pairing[k] for k in ("step", "rho", "seeds_paired", "why")} == {
        "step": "pairing", "rho": None, "seeds_paired": [1],
        "why": "rho-hat needs 2 seeds that both codes finished; 1 did"}
    assert summary["pairing_rho"] is None
    assert summary["steps"]["pairing-matrix_lr_x1.1-seed2"] == "failed"


def test_an_unknown_step_is_refused_naming_the_steps(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--steps", "main,warp", "--out", str(tmp_path / "x.jsonl")])
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "--steps: unknown step(s) warp; the steps are main, pair, sdpa, pairing")


def test_a_run_past_its_time_is_killed_and_reported(tmp_path):
    src = write_stub_run(tmp_path / "src", HANGING_STUB)
    with pytest.raises(train_variants.RunFailed, match="killed at the deadline"):
        train_variants.run_train(src, budget=1, timeout=1)


def test_a_prepare_that_fails_ends_the_check_with_its_error_line(tmp_path):
    (tmp_path / "not-a-folder").write_text("")
    out = tmp_path / "check.jsonl"
    with pytest.raises(SystemExit, match="^error: gpu check: prepare: prepare.py --offline failed"):
        gpu_check.main(["--cache", str(tmp_path / "not-a-folder"), "--out", str(out)])
    [line] = check_lines(out)
    assert line["step"] == "prepare" and "FileExistsError" in line["stderr_tail"]


def make_wheel(folder, name="alr_probe", version="0.1"):
    """A minimal pure-Python wheel, as pip builds them: a module and its dist-info."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}.py": "ANSWER = 42\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{dist}/RECORD,,\n"
    folder.mkdir()
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return folder


def test_gpu_check_installs_the_wheels_it_is_given_offline(tmp_path):
    env = gpu_check.install_wheels(make_wheel(tmp_path / "wheels"), tmp_path / "site")
    proc = subprocess.run([sys.executable, "-c", "import alr_probe; print(alr_probe.ANSWER)"],
                          env={**os.environ, **env}, capture_output=True, text=True, cwd=tmp_path)
    assert proc.stdout.strip() == "42", proc.stderr
