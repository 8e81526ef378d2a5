"""The noise estimate and the integrity reference through analyze.py, on synthetic runs in a real git
repository (issue 10, items 4 and 5): a rerun under a seed already used is not a repeat, and the store's
rules are those of its first *finished* run."""

import pytest

import synthetic
from repos import analyze, baseline, commit_change, fake_run, ledger

# these tests analyse runs written by tests/synthetic.py, which never trained
pytestmark = pytest.mark.usefixtures("accept_synthetic")


def test_a_rerun_under_the_same_seed_is_not_pooled_and_the_next_command_names_a_new_one(repo):
    baseline(repo)  # seeds 42, 43, 44
    commit_change(repo, "MATRIX_LR = 0.04", "MATRIX_LR = 0.045", "matrix lr 0.045")
    fake_run(repo, 0.9970, seed=42)
    first = analyze(repo)
    assert "verdict: RERUN" in first.stdout and ledger(repo)[-1]["n_pooled"] == 1
    assert "next: SEED=43 uv run launch.py && uv run analyze.py" in first.stdout
    fake_run(repo, 0.9970, seed=42, offset=(10, 0.001), started_at="2026-12-01T10:00:00+0000",
             log="the same code and seed again\n")  # it measures nothing
    again = analyze(repo)
    row = ledger(repo)[-1]
    assert row["verdict"] == "rerun" and row["n_pooled"] is None and row["status"] == "rerun"
    assert f"already ran under this SEED (run {ledger(repo)[-2]['run_id']})" in again.stdout
    assert "next: SEED=43 uv run launch.py" in again.stdout
    fake_run(repo, 0.9968, seed=43)
    third = analyze(repo)
    assert ledger(repo)[-1]["n_pooled"] == 2, third.stdout  # the two distinct seeds, not the repeat
    assert "verdict: RERUN" in third.stdout and "next: SEED=44 uv run launch.py" in third.stdout


def test_the_integrity_reference_is_the_first_finished_run_not_a_crash_before_it(repo):
    synthetic.write_run(repo, log="Traceback (most recent call last):\n  File \"train.py\", line 1\nSyntaxError: x\n")
    assert analyze(repo).returncode == 0 and ledger(repo)[0]["status"] == "crash"
    fake_run(repo, 1.0, budget_s=300.0)
    assert analyze(repo).returncode == 0 and ledger(repo)[-1]["integrity"] == []
    fake_run(repo, 0.9, seed=43, budget_s=600.0)  # trained for twice the budget of the first finished run
    assert analyze(repo).returncode == 0
    row = ledger(repo)[-1]
    assert row["status"] == "invalid"
    assert any("time_budget_s 600.0 differs from the first run" in p for p in row["integrity"]), row["integrity"]


def test_the_logger_stamps_its_own_clock_and_takes_the_agents_metrics(in_process_run, tmp_path):
    import json

    import pytest
    import torch

    from harness import contract, metric
    logger = in_process_run
    logger.start_clock(torch.nn.Linear(2, 2), tokens_per_step=1024, flops_per_token=6.0)
    stamped = {*contract.HARNESS_STEP_KEYS, *contract.DERIVED_STEP_KEYS}
    record = {k: v for k, v in synthetic.make_records(n_steps=1)[0].items() if k not in stamped}
    with pytest.raises(contract.HarnessError, match="harness/wall_s: stamped by the harness, not by train.py"):
        logger.log_step({**record, contract.WALL_S: 0.0})
    for bad in ({"agent/": 1.0}, {"agent/note": "text"}, {"mine/x": 1.0}):
        with pytest.raises(contract.HarnessError, match="breaks the contract"):
            logger.log_step({**record, **bad})
    metric.EVALUATION_CLOCK.seconds += 2.5  # what evaluate_val adds after an evaluation
    logger.log_step({**record, "agent/grad_clip_frac": 0.25})
    [line] = (tmp_path / "metrics.jsonl").read_text().splitlines()
    written = json.loads(line)
    assert written["agent/grad_clip_frac"] == 0.25 and written[contract.EVAL_S] == 2.5
    assert 0 <= written[contract.WALL_S] < 600
    assert contract.step_record_problems(written) == []


def test_the_keep_policy_is_the_humans_choice_through_the_environment(repo, monkeypatch):
    import numpy as np
    from scipy import stats

    from analysis import verdict
    best = [1.0, 1.002, 0.998]  # σ = 0.002 on 2 df
    se = 0.002 * np.sqrt(1 / 3 + 1 / 3)
    candidate = [float(np.mean(best)) + stats.t.ppf(0.2, 2) * se] * 3  # one-sided p = 0.2 on 3 runs
    noise = verdict.noise_estimate([best])
    assert verdict.decide(candidate, best, noise, policy=verdict.POLICIES["gain"])["verdict"] == "keep"
    assert verdict.decide(candidate, best, noise, policy=verdict.POLICIES["validated"])["verdict"] == "discard"

    fake_run(repo, 1.0)
    monkeypatch.setenv(verdict.VERDICT_ENV, "greedy")
    refused = analyze(repo)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        "error: AUTORESEARCH_VERDICT='greedy' is not a verdict mode; use one of paired, validated, gain (default paired)"]
    assert ledger(repo) == []  # refused before anything was archived
    monkeypatch.setenv(verdict.VERDICT_ENV, "gain")
    baseline(repo, values=(1.0, 1.002))
    assert [r.get("verdict_mode") for r in ledger(repo)] == [None, None]  # a baseline is no test of a policy
    commit_change(repo, "MATRIX_LR = 0.04", "MATRIX_LR = 0.05", "matrix lr 0.05")
    fake_run(repo, 0.99, seed=50)
    assert analyze(repo).returncode == 0 and ledger(repo)[-1]["verdict_mode"] == "gain"
    assert "verdict mode: gain ($AUTORESEARCH_VERDICT; default paired)" in analyze(repo, "status").stdout
    monkeypatch.delenv(verdict.VERDICT_ENV)
    assert "verdict mode: paired (the default)" in analyze(repo, "status").stdout
