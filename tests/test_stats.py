"""Trajectory statistics on curves with a known answer (analysis/stats.py)."""

import numpy as np
import pytest

from harness import contract
import synthetic
from analysis import stats


def power_law(n=1500, l_inf=2.5, a=4.0, alpha=0.6, noise=0.01, seed=0):
    steps = np.arange(n, dtype=float)
    rng = np.random.default_rng(seed)
    return steps, l_inf + a * (steps + 1) ** -alpha + rng.normal(0, noise, n)


def test_planted_power_law_is_recovered():
    steps, loss = power_law()
    fit = stats.fit_power_law(steps, loss)
    assert fit["ok"]
    assert fit["l_inf"] == pytest.approx(2.5, abs=0.05)
    assert fit["alpha"] == pytest.approx(0.6, abs=0.08)
    assert fit["r2"] > 0.95
    # extrapolation to twice the steps follows the planted curve
    assert fit["at_extrapolated"] == pytest.approx(2.5 + 4.0 * 3000 ** -0.6, abs=0.01)
    assert fit["at_extrapolated"] < fit["at_last"]


def test_power_law_needs_enough_points():
    assert not stats.fit_power_law(np.arange(5), np.ones(5))["ok"]
    assert not stats.fit_power_law(np.arange(100), np.ones(100))["ok"]  # constant: nothing to fit


def test_flat_tail_is_not_improving_and_a_falling_one_is():
    rng = np.random.default_rng(1)
    steps = np.arange(1000, dtype=float)
    flat = 3.0 + rng.normal(0, 0.05, 1000)
    assert stats.tail_slope(steps, flat)["improving"] is False
    falling = 3.0 - 0.0005 * steps + rng.normal(0, 0.05, 1000)
    tail = stats.tail_slope(steps, falling)
    assert tail["improving"] is True
    assert tail["slope"] == pytest.approx(-0.0005, abs=0.0002)
    assert (tail["from_step"], tail["to_step"]) == (800, 999)


def test_planted_spike_is_found_with_its_recovery():
    steps, loss = power_law(n=1000, noise=0.02)
    loss[600:603] += np.array([1.5, 0.8, 0.3])  # one event over three steps
    loss[300] += 1.0
    events = stats.loss_spikes(steps, loss)
    assert [e["step"] for e in events] == [300, 600]
    assert events[1]["z"] > stats.SPIKE_Z
    assert events[1]["recovered_after"] is not None and events[1]["recovered_after"] <= 6


def test_noise_alone_has_no_spikes():
    steps, loss = power_law(n=3000, noise=0.02, seed=3)
    assert stats.loss_spikes(steps, loss) == []


def test_planted_divergence_step_is_found():
    steps, base = power_law(n=1000, noise=0.0)
    rng = np.random.default_rng(2)
    best = base + rng.normal(0, 0.02, 1000)
    this = base + rng.normal(0, 0.02, 1000)
    this[400:] -= 0.05 * np.minimum((steps[400:] - 400) / 100, 1.0)  # parts at step 400, 0.05 lower by 500
    div = stats.divergence(steps, this, steps, best)
    assert div["ok"] and div["diverged"]
    assert div["direction"] == "lower"
    assert 360 <= div["separated_at"] <= 440
    assert div["beyond_noise_from"] >= div["separated_at"]
    assert div["final_gap"] == pytest.approx(-0.05, abs=0.01)


def test_identical_runs_do_not_diverge():
    steps, base = power_law(n=1000, noise=0.0)
    rng = np.random.default_rng(4)
    div = stats.divergence(steps, base + rng.normal(0, 0.02, 1000), steps, base + rng.normal(0, 0.02, 1000))
    assert div["ok"] and not div["diverged"]
    assert abs(div["final_gap"]) < div["threshold"]


def test_layer_outlier_and_norm_drift_are_found():
    records = synthetic.make_records(n_steps=400, depth=6, layer_every=20,
                                     grad_scale={"blocks.4.mlp.c_fc.weight": 20.0},
                                     norm_growth={"blocks.2.attn.c_v.weight": 5.0})  # 2x from a quarter in
    findings = stats.layer_findings(stats.layer_table(records))
    flagged = {(o["name"], o["stat"]) for o in findings["outliers"]}
    assert flagged == {("blocks.4.mlp.c_fc.weight", "grad_norm")}
    outlier = findings["outliers"][0]
    assert outlier["layer"] == 4 and outlier["ratio"] > 10
    drifted = [d["name"] for d in findings["drift"] if d["flag"]]
    assert drifted == ["blocks.2.attn.c_v.weight"]


def test_too_few_layers_for_outliers_is_said():
    records = synthetic.make_records(n_steps=100, depth=2, layer_every=10)
    findings = stats.layer_findings(stats.layer_table(records))
    assert findings["outliers"] == []
    assert "blocks.*.mlp.c_fc.weight" in findings["kinds_with_too_few_layers"]


def test_train_val_gap_uses_the_same_units():
    records = synthetic.make_records(n_steps=200)
    rows = stats.train_val_gap(records)
    assert len(rows) >= 10 and rows[-1]["step"] == 199
    for row, rec in zip(rows, [r for r in records if contract.VAL_BPB in r]):
        assert row["gap"] == pytest.approx(rec[contract.VAL_LOSS] - rec[contract.TRAIN_LOSS_SMOOTH])


def test_step_time_stats():
    ms = np.r_[np.full(98, 100.0), 500.0, 90.0]
    st = stats.step_time_stats(ms)
    assert st["median_ms"] == 100.0 and st["max_ms"] == 500.0 and st["slow_steps"] == 1


def test_layer_kind():
    assert stats.layer_kind("blocks.11.attn.c_q.weight") == ("blocks.*.attn.c_q.weight", 11)
    assert stats.layer_kind("lm_head.weight") == ("lm_head.weight", None)
