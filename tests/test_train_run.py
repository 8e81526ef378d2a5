"""train.py as a user runs it (`launch.py`: train.py beside the harness's evaluator): a tiny-budget CPU run honours the metrics and summary contract, and
crash, NaN and hang runs end with the right status and never leave an earlier run's summary behind."""

import json
import math
import time

import pytest

import synthetic
from harness import contract, metric
from conftest import ROOT, run_script

HARNESS = ("train.py", "prepare.py", "launch.py")


def workdir(tmp_path, replace=None, stale_summary=True):
    """A copy of the scripts in tmp_path, optionally with train.py edited (old -> new, old must exist)."""
    synthetic.copy_harness(tmp_path, HARNESS)
    if replace:
        source = (tmp_path / "train.py").read_text()
        for old, new in replace.items():
            assert old in source, f"train.py no longer contains {old!r}: update this test's fault injection"
            source = source.replace(old, new, 1)
        (tmp_path / "train.py").write_text(source)
    if stale_summary:  # what a previous, successful run left behind
        (tmp_path / "run_summary.json").write_text(json.dumps({"status": "ok", "val_bpb": 0.5, "stale": True}))
        (tmp_path / "metrics.jsonl").write_text('{"step": 999}\n')
    return tmp_path


def train(cwd, budget=4, **env):
    return run_script(["launch.py"], cwd=cwd, env_extra={"AUTORESEARCH_TIME_BUDGET": str(budget), **env}, timeout=300,
                      umask=0o022)


def read_metrics(cwd):
    return [json.loads(line) for line in (cwd / "metrics.jsonl").read_text().splitlines()]


def read_summary(cwd):
    return json.loads((cwd / "run_summary.json").read_text())


@pytest.fixture(scope="module")
def smoke(prepared, tmp_path_factory):
    cwd = workdir(tmp_path_factory.mktemp("smoke"))
    proc = train(cwd)
    return cwd, proc


def test_smoke_run_succeeds(smoke):
    cwd, proc = smoke
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "no CUDA GPU" in proc.stdout  # the CPU configuration is announced


def test_the_runs_files_and_its_seal_are_its_owners_only(smoke):
    """Run without the night (whose own umask is 077), from a shell whose umask is the usual 022:
    launch.py still creates run.log, the run's files and the seal readable by their owner only."""
    cwd, _ = smoke
    seal = contract.seal_path(cwd, read_summary(cwd)["started_at"])
    modes = {p.name: p.stat().st_mode & 0o777
             for p in (cwd / "run.log", cwd / "metrics.jsonl", cwd / "run_summary.json", seal)}
    assert modes == {"run.log": 0o600, "metrics.jsonl": 0o600, "run_summary.json": 0o600,
                     seal.name: 0o600}


def test_metrics_follow_the_contract(smoke):
    cwd, _ = smoke
    records = read_metrics(cwd)
    assert len(records) >= 3
    for rec in records:
        assert contract.step_record_problems(rec) == [], rec
    assert [r[contract.STEP] for r in records] == list(range(len(records)))  # fresh file, every step
    times = [r[contract.TIME_S] for r in records]
    assert times == sorted(times)
    assert 0 <= records[0][contract.PROGRESS] and records[-1][contract.PROGRESS] == pytest.approx(1.0)
    val = [r[contract.VAL_BPB] for r in records if contract.VAL_BPB in r]
    assert len(val) >= 2
    assert contract.VAL_BPB in records[-1]  # the curve always ends at the end of training
    assert all(0 < v < 20 for v in val)
    assert all((contract.VAL_BPB in r) == (contract.VAL_LOSS in r) for r in records)  # measured together


def test_layer_stats_cover_every_matrix(smoke):
    cwd, _ = smoke
    records = read_metrics(cwd)
    summary = read_summary(cwd)
    every = summary["config"]["LAYER_STATS_EVERY"]
    with_stats = [r[contract.STEP] for r in records if any(contract.parse_layer_key(k) for k in r)]
    assert with_stats == [s for s in range(len(records)) if s % every == 0]
    names = {contract.parse_layer_key(k)[0] for k in records[0] if contract.parse_layer_key(k)}
    assert {"wte.weight", "lm_head.weight", "blocks.0.attn.c_q.weight", "blocks.1.mlp.c_fc.weight"} <= names
    for name in names:
        for stat in contract.LAYER_STATS:
            assert contract.layer_key(name, stat) in records[0]
    # step 0: the zero-initialised output projections get gradient, the inputs to them not yet
    assert records[0][contract.layer_key("blocks.0.mlp.c_proj.weight", "grad_norm")] > 0
    assert records[0][contract.layer_key("lm_head.weight", "update_ratio")] > 0


def test_summary_follows_the_contract(smoke):
    cwd, proc = smoke
    summary = read_summary(cwd)
    assert "stale" not in summary
    assert contract.summary_problems(summary) == []
    assert summary["status"] == "ok"
    assert summary["num_steps"] == len(read_metrics(cwd))
    assert summary["training_seconds"] >= 4
    assert summary["total_seconds"] > summary["training_seconds"] + summary["startup_seconds"] * 0.99
    assert summary["seed"] == 42 and summary["device"] == "cpu" and summary["depth"] == 2
    assert summary["causality"]["ok"] is True and summary["causality"]["max_change"] <= metric.CAUSALITY_TOLERANCE
    assert summary["evaluator"]["rows"] == metric.eval_rows("cpu") and summary["evaluator"]["device"] == "cpu"
    assert summary["data"]["source"] == "offline" and summary["data"]["smoke_test"] is True
    assert summary["harness_hash"] == contract.harness_hash(ROOT)  # the one definition, of this checkout
    assert summary["train_sha256"] == contract.sha256_file(cwd / "train.py")
    config = summary["config"]
    for name in ("DEPTH", "MATRIX_LR", "WINDOW_PATTERN", "TOTAL_BATCH_SIZE", "SEED", "ADAM_BETAS"):
        assert name in config
    assert config["DEPTH"] == 2  # the values in effect (CPU configuration), not the file's defaults


def test_final_block_is_greppable(smoke):
    cwd, proc = smoke
    summary = read_summary(cwd)
    lines = proc.stdout.splitlines()
    block = lines[lines.index("---") + 1:]
    keys = [line.split(":")[0] for line in block]
    assert keys[:len(contract.FINAL_BLOCK_KEYS)] == list(contract.FINAL_BLOCK_KEYS)
    val_line = next(line for line in lines if line.startswith("val_bpb:"))
    assert float(val_line.split()[1]) == pytest.approx(summary["val_bpb"], abs=1e-6)
    assert "SMOKE-TEST" in block[-1]  # the data is labelled as a smoke-test corpus


def test_a_constant_the_agent_adds_is_captured(prepared, tmp_path):
    cwd = workdir(tmp_path, {"# Instrumentation and safety\n": "MY_NEW_KNOB = (3, 'x')\n# Instrumentation and safety\n"})
    proc = train(cwd, budget=0.5)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert read_summary(cwd)["config"]["MY_NEW_KNOB"] == [3, "x"]


def test_the_device_is_the_harnesss_not_what_train_py_says(prepared, tmp_path):
    cwd = workdir(tmp_path, {"run.start_clock(model, TOTAL_BATCH_SIZE, flops_per_token)\n":
                             "run.start_clock(model, TOTAL_BATCH_SIZE, flops_per_token)\n"
                             "run.set(device='NVIDIA H100 80GB HBM3')\n"})
    proc = train(cwd, budget=0.5)
    assert proc.returncode == 1
    assert "error: run_summary.json's device: written by the harness, not by train.py" in proc.stdout  # run.log's
    summary = read_summary(cwd)
    assert summary["status"] == "crash" and summary["device"] == "cpu"  # the harness's reading, even so


def test_seed_changes_the_run(prepared, smoke, tmp_path):
    cwd = workdir(tmp_path)
    proc = train(cwd, budget=0.5, SEED="7")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert read_summary(cwd)["seed"] == 7
    first = read_metrics(cwd)[0][contract.TRAIN_LOSS]
    assert first != read_metrics(smoke[0])[0][contract.TRAIN_LOSS]


def test_crash_reports_crash_not_the_stale_result(prepared, tmp_path):
    cwd = workdir(tmp_path, {"        train_loss = loss.detach()\n":
                             "        train_loss = loss.detach()\n        if step == 1: raise RuntimeError('injected failure')\n"})
    proc = train(cwd)
    assert proc.returncode != 0
    assert "Traceback" in proc.stdout and "injected failure" in proc.stdout  # all of run.log, shown
    summary = read_summary(cwd)
    assert summary["status"] == "crash" and summary["val_bpb"] is None
    assert "injected failure" in summary["error"]
    assert "stale" not in summary
    records = read_metrics(cwd)
    assert [r[contract.STEP] for r in records] == [0]  # the stale metrics are gone too


@pytest.mark.parametrize("fault", [
    {"        train_loss = loss.detach()\n": "        train_loss = loss.detach() * float('nan')\n"},
    {"    loss_f = train_loss.item()": "    loss_f = train_loss.item() * (100 if step == 2 else 1)"},
], ids=["nan", "exploding"])
def test_divergence_stops_at_once_with_status_nan(prepared, tmp_path, fault):
    cwd = workdir(tmp_path, fault)
    proc = train(cwd, budget=60)
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout
    summary = read_summary(cwd)
    assert summary["status"] == "nan" and summary["val_bpb"] is None
    assert "diverged" in summary["error"]
    records = read_metrics(cwd)
    assert all(math.isfinite(r[contract.TRAIN_LOSS]) for r in records)
    assert len(records) <= 2  # stopped at the bad step, not at the end of the budget


HANG_WATCHDOG_S = 5  # counted from the hang itself (below), so no guess of how fast this machine starts a run


def test_hung_run_is_killed_with_status_timeout(prepared, tmp_path):
    # The run's watchdog starts when the run hangs at step 2, not at setup: its limit is then relative to
    # an event of the run, however long startup takes on a loaded machine (a limit counted from setup
    # once fired before step 2). The harness's own, started with the run, is the same class with the
    # default limit (an hour here), stopped first.
    cwd = workdir(tmp_path, {
        "        optimizer.step()\n": "        optimizer.step()\n"
                                      "    if step == 2:\n"
                                      "        from harness.runlog import Watchdog\n"
                                      "        run.watchdog.stop()\n"
                                      f"        Watchdog(run, {HANG_WATCHDOG_S})\n"
                                      "        print('hanging at step 2', flush=True)\n"
                                      "        time.sleep(3600)\n"})
    proc = train(cwd, budget=60, AUTORESEARCH_WATCHDOG_S="3600")  # run_script's timeout: the net
    assert proc.returncode == 124, proc.stdout[-3000:]
    assert "hanging at step 2" in proc.stdout
    assert f"watchdog: run exceeded {HANG_WATCHDOG_S}s of wall time (budget 60s)" in proc.stdout
    summary = read_summary(cwd)
    assert summary["status"] == "timeout" and summary["val_bpb"] is None
    assert "watchdog" in summary["error"]
    assert summary["num_steps"] == 2
    assert [r[contract.STEP] for r in read_metrics(cwd)] == [0, 1]  # the steps before the hang, kept


def test_sigterm_is_a_crash_said_to_come_from_outside_and_a_second_one_cannot_cut_the_summary(prepared, tmp_path):
    import signal
    import subprocess
    import sys
    cwd = workdir(tmp_path)
    env = {**__import__("os").environ, "AUTORESEARCH_TIME_BUDGET": "120"}
    proc = subprocess.Popen([sys.executable, "launch.py"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((cwd / "metrics.jsonl").exists()
                                          and (cwd / "metrics.jsonl").read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # a supervisor escalating, or a second Ctrl-C: ignored while finishing
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    summary = read_summary(cwd)
    assert summary["status"] == "crash"
    assert summary["error"].startswith("KeyboardInterrupt: terminated by SIGTERM after ")
    assert "killed from outside" in summary["error"]


def test_a_model_that_reads_the_targets_fails_the_harnesss_causality_probe(prepared, tmp_path):
    from analysis import integrity
    cwd = workdir(tmp_path, {"        x = x0 = norm(self.wte(idx).to(dtype))\n":
                             "        x = x0 = norm((self.wte(idx) + self.wte(torch.roll(idx, -1, dims=1))).to(dtype))\n"})
    proc = train(cwd, budget=2)
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = read_summary(cwd)
    assert summary["causality"]["ok"] is False and summary["causality"]["max_change"] > 0.1
    [problem] = integrity.causality_problems(summary)
    assert "the model reads the future" in problem


def test_a_second_launch_while_a_run_trains_is_refused_and_touches_nothing(prepared, tmp_path):
    """launch.py writes run.log itself and takes the run lock before it touches anything: a second
    `uv run launch.py` while a run trains is refused, and the first run ends sealed, as if alone."""
    import os
    import subprocess
    import sys
    from analysis import integrity
    cwd = workdir(tmp_path, stale_summary=False)
    env = {**os.environ, "AUTORESEARCH_TIME_BUDGET": "20"}
    shown = tmp_path / "terminal.txt"
    with open(shown, "w") as terminal:
        first = subprocess.Popen([sys.executable, "launch.py"], cwd=cwd, env=env, stdout=terminal,
                                 stderr=subprocess.STDOUT)
    metrics = cwd / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # training, on the clock
        assert first.poll() is None, "the first run ended before its second step"
        time.sleep(0.1)
    log_so_far = (cwd / "run.log").read_text()
    second = run_script(["launch.py"], cwd=cwd, env_extra={"AUTORESEARCH_TIME_BUDGET": "20"})
    assert second.returncode == 1 and second.stdout == ""
    assert second.stderr == (f"error: a run is already training in {cwd.resolve()} (pid {first.pid}); its files "
                             f"are untouched: wait for it, or end it\n")
    assert (cwd / "run.log").read_text().startswith(log_so_far)  # not truncated, nothing of the second
    assert first.wait(timeout=600) == 0
    log = (cwd / "run.log").read_text()
    assert log.count(contract.LOG_STAMP_PREFIX) == 1 and "\nval_bpb:" in log
    summary = read_summary(cwd)
    assert summary["status"] == "ok" and summary["evaluator"]["device"] == "cpu"
    assert integrity.seal_problems(summary, cwd, contract.sha256_file(cwd / "metrics.jsonl")) == []
    assert shown.read_text() == log  # what it showed is what run.log holds


def test_a_model_the_evaluator_cannot_evaluate_ends_a_crash_that_says_why(prepared, tmp_path):
    """The evaluator refuses logits of the wrong shape: the run is a crash with its one-line reason,
    train.py (still serving) is ended, and no number is written."""
    cwd = workdir(tmp_path, {"        if targets is None:\n            return logits\n":
                             "        if targets is None:\n"
                             "            return logits.sum(-1) if getattr(self, 'final', False) else logits\n",
                             "model.eval()\nwith autocast:\n    run.finish(":
                             "model.final = True\nmodel.eval()\nwith autocast:\n    run.finish("})
    proc = train(cwd, budget=2)
    assert proc.returncode != 0
    summary = read_summary(cwd)
    assert summary["status"] == "crash" and summary["val_bpb"] is None and summary["evaluator"] is None
    assert summary["error"].startswith("the harness's evaluator failed (exit 1): error: the model returned (")
    assert summary["error"].endswith("model(x) must return float logits (B, T, vocab) with vocab >= 1024")
    log = (cwd / "run.log").read_text()
    assert "\nval_bpb:" not in log and "must return float logits (B, T, vocab)" in log
