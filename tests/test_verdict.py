"""The noise estimate and the verdict on planted noise (analysis/verdict.py)."""

import math

import numpy as np
import pytest

from analysis import verdict

SIGMA = 0.002  # seed-to-seed noise of the simulated runs


def test_noise_estimate_pools_within_group_variance():
    a, b = [1.0, 1.002, 1.004], [2.0, 2.004]
    noise = verdict.noise_estimate([a, b, [5.0]])  # a single run carries no information
    ss = np.var(a) * 3 + np.var(b) * 2
    assert noise["df"] == 3 and noise["n_groups"] == 2 and noise["trusted"]
    assert noise["sigma"] == pytest.approx(np.sqrt(ss / 3))
    assert verdict.noise_estimate([[1.0], [2.0]]) == {"sigma": None, "df": 0, "n_groups": 0, "trusted": False}
    assert not verdict.noise_estimate([[1.0, 1.1]])["trusted"]  # 1 df < MIN_NOISE_DF


def test_no_best_keeps_the_baseline_and_failures_are_crash():
    assert verdict.decide([1.0])["verdict"] == "keep"
    assert verdict.decide([], failed="nan")["verdict"] == "crash"


def test_worse_is_discarded_and_clearly_better_is_kept():
    noise = verdict.noise_estimate([[1.0, 1.002, 0.998]])
    assert verdict.decide([1.01], [1.0, 1.002, 0.998], noise)["verdict"] == "discard"
    first = verdict.decide([0.97], [1.0, 1.002, 0.998], noise)  # 15σ on one run, but σ has 2 df only: confirm it
    assert first["verdict"] == "rerun" and first["confirm"] and "not yet confirmed" in first["reason"]
    best, cand = [1.0, 1.002, 0.998], [0.97, 0.971, 0.969]
    kept = verdict.decide(cand, best, verdict.noise_estimate([best, cand]))
    assert kept["verdict"] == "keep" and kept["p_value"] < verdict.KEEP_ALPHA and kept["delta"] < 0


def test_within_noise_is_rerun_while_promising_then_discarded():
    best = [1.0, 1.002, 0.998]
    noise = verdict.noise_estimate([best])
    assert verdict.decide([0.997], best, noise)["verdict"] == "rerun"  # p = 0.16 < the first futility bound
    futile = verdict.decide([0.999], best, noise)  # p = 0.35: not worth another 5-minute run
    assert futile["verdict"] == "discard" and "too small to resolve" in futile["reason"]
    policy = verdict.POLICIES[verdict.VERDICT_MODE]
    capped = verdict.decide([0.999] * policy["max_runs"], best, noise, policy={**policy, "futility": (0.5,) * 9})
    assert capped["verdict"] == "discard" and "still within the noise after" in capped["reason"]


def test_welch_test_reported_with_repeats_on_both_sides():
    best, cand = [1.0, 1.002, 0.998], [0.990, 0.991]
    d = verdict.decide(cand, best, verdict.noise_estimate([best, cand]))
    assert d["p_welch"] is not None and 0 < d["p_welch"] < 0.05
    assert verdict.decide([0.99], best, verdict.noise_estimate([best]))["p_welch"] is None


def test_without_noise_estimate_the_fallback_margin_is_conservative():
    d = verdict.decide([0.996], [1.0], verdict.noise_estimate([]))
    assert "no noise estimate" in d["sigma_source"]
    assert d["sigma"] == pytest.approx(verdict.FALLBACK_NOISE_FRACTION * 1.0)
    assert d["verdict"] == "discard"  # 0.4 % better is not enough unmeasured


def test_same_code_as_best_is_pooled_not_judged():
    d = verdict.decide([1.01, 1.0], [1.01, 1.0], verdict.noise_estimate([[1.01, 1.0]]), same_as_best=True)
    assert d["verdict"] == "keep" and "repeat" in d["reason"]


def simulate(effect_sigmas: float, trials: int, seed: int) -> float:
    """The loop as program.md runs it: a 3-seed baseline, then a candidate rerun while the verdict says so."""
    rng = np.random.default_rng(seed)
    keeps = 0
    for _ in range(trials):
        best = list(rng.normal(1.0, SIGMA, 3))
        candidate = []
        while True:
            candidate.append(rng.normal(1.0 - effect_sigmas * SIGMA, SIGMA))
            d = verdict.decide(candidate, best, verdict.noise_estimate([best, candidate]))
            if d["verdict"] != "rerun":
                keeps += d["verdict"] == "keep"
                break
    return keeps / trials


def test_a_seed_only_change_is_rarely_kept():
    # the candidate is the baseline under another seed: every keep is a false keep. Against a fresh 3-run
    # baseline (σ on 2 df) the sequential rule keeps about 6 % of them; in a night, where the noise gains df and
    # most no-ops stop after one run, that is under 1 false keep per night (tests/test_night_sim.py)
    assert simulate(0.0, trials=600, seed=0) <= 0.07


def test_a_real_improvement_is_usually_kept():
    assert simulate(4.0, trials=300, seed=1) >= 0.85


def test_revert_target_is_the_stores_best_whatever_the_failed_run_recorded():
    def run(code, val, status="keep", device="H100"):
        return {"train_sha256": code, "val_bpb": val, "status": status, "device": device, "time_budget_s": 300.0,
                "harness_hash": "h", "data": {"manifest_hash": "m"}}
    base = [run("a", 1.0), run("a", 1.002), run("b", 0.99), run("c", 0.98, status="discard")]
    assert verdict.revert_target(base, run("c", 0.98, status="discard")) == ("b", [base[2]])  # its own pool's best
    crashed = run("d", None, status="crash", device=None)  # died before train.py recorded its device
    assert verdict.revert_target(base + [crashed], crashed) == ("b", [base[2]])
    invalid = {**run("e", 0.5, status="invalid"), "harness_hash": "edited"}
    assert verdict.revert_target(base + [invalid], invalid) == ("b", [base[2]])
    elsewhere = run("f", 0.7, status="pending", device="A100")  # a new pool: nothing kept there
    assert verdict.revert_target(base + [elsewhere], elsewhere) == ("b", [base[2]])
    assert verdict.revert_target([crashed], crashed) is None  # nothing kept at all


def test_a_run_in_a_new_pool_is_not_a_silent_new_baseline():
    kept = {"device": "NVIDIA H100 80GB HBM3", "time_budget_s": 300.0, "harness_hash": "h", "data": {"manifest_hash": "m"}}
    moved = {**kept, "device": "cpu", "time_budget_s": 60.0}
    assert verdict.pool_changes(moved, kept) == ["device 'NVIDIA H100 80GB HBM3' -> 'cpu'", "budget 300.0 -> 60.0"]
    assert verdict.pool_changes(kept, kept) == []
    decision = verdict.decide([0.5], None, new_pool=verdict.pool_changes(moved, kept))
    assert decision["verdict"] == "discard"
    assert decision["reason"] == ("NEW POOL: not comparable with the kept runs (device 'NVIDIA H100 80GB HBM3' -> 'cpu'; "
                                  "budget 300.0 -> 60.0), so not kept; if that change is meant, start a new baseline: "
                                  "`uv run analyze.py keep --new-baseline`")
    assert verdict.decide([0.5], None)["verdict"] == "keep"  # the store's very first run is the baseline


def test_repeats_that_agree_to_the_last_digit_cannot_make_a_tiny_difference_significant():
    best = [1.0, 1.0, 1.0]  # a collapsed estimate: σ = 0 with 2 df
    d = verdict.decide([0.99999], best, verdict.noise_estimate([best]))
    assert d["verdict"] == "discard" and d["sigma"] == pytest.approx(verdict.NOISE_FLOOR_FRACTION)
    assert "floor" in d["sigma_source"]
    assert verdict.decide([0.99], best, verdict.noise_estimate([best]))["verdict"] == "keep"  # 50 floors better


def test_only_distinct_seeds_are_pooled_as_repeats():
    def run(run_id, seed, val):
        return {"run_id": run_id, "train_sha256": "a", "seed": seed, "val_bpb": val, "status": "pending",
                "device": "H100", "time_budget_s": 300.0, "harness_hash": "h", "data": {"manifest_hash": "m"}}
    ledger = [run("r1", 42, 1.0), run("r2", 42, 1.0), run("r3", 43, 1.002)]
    assert [r["run_id"] for r in verdict.pools(ledger, verdict.comparable_key(ledger[0]))["a"]] == ["r1", "r3"]
    assert verdict.same_seed_run(ledger[:1], ledger[1])["run_id"] == "r1"
    assert verdict.same_seed_run(ledger[:2], ledger[2]) is None
    assert verdict.next_seed(ledger[:2], ledger[2]) == 44
    d = verdict.decide([], repeats_seed_of="r1")
    assert d["verdict"] == "rerun" and "run r1" in d["reason"] and "new SEED" in d["reason"]


BORDER = 1e-3  # relative step around a bound: p just below it, p just above it


def candidate_with_p(p_target: float, n: int, best, spread=0.0):
    """n candidate values (mean shifted, `spread` apart) whose one-sided p against `best` is p_target, with the
    pooled σ and Student's t recomputed by hand with scipy, not by analysis/verdict.py."""
    from scipy import stats
    offsets = (np.arange(n) - (n - 1) / 2) * spread
    groups = [best] + ([list(offsets)] if n > 1 else [])
    df = sum(len(g) - 1 for g in groups)
    sigma = np.sqrt(sum(((np.asarray(g) - np.mean(g)) ** 2).sum() for g in groups) / df)
    shift = stats.t.ppf(p_target, df) * sigma * np.sqrt(1 / n + 1 / len(best))
    return list(float(np.mean(best)) + shift + offsets)


@pytest.mark.parametrize("n, bound_name, below, above", [
    (1, "strong_alpha", "keep", "rerun"),      # one run: kept only when unmistakable, else confirmed
    (1, "futility0", "rerun", "discard"),      # one run: promising or not worth another run
    (2, "futility1", "rerun", "discard"),
    (3, "keep_alpha", "keep", "discard"),      # confirmed: keep, else p >= keep_alpha > futility[2] stops it
    (4, "keep_alpha", "keep", "discard"),      # the last run: keep or discard
])
def test_a_borderline_decision_follows_students_t_as_scipy_computes_it(n, bound_name, below, above):
    policy = verdict.POLICIES[verdict.VERDICT_MODE]
    bound = policy["futility"][int(bound_name[-1])] if bound_name.startswith("futility") else policy[bound_name]
    best = [1.0, 1.002, 0.998]
    for p_target, expected in ((bound * (1 - BORDER), below), (bound * (1 + BORDER), above)):
        cand = candidate_with_p(p_target, n, best, spread=0.001)
        d = verdict.decide(cand, best, verdict.noise_estimate([best, cand] if n > 1 else [best]))
        assert d["p_value"] == pytest.approx(p_target, rel=1e-6)
        assert d["verdict"] == expected, (n, bound_name, p_target, d["reason"])


def test_the_vectorised_rule_is_the_scalar_one():
    """decide() and bench/night_sim.py share sequential_verdict: arrays give the scalars' answers."""
    n = np.array([1, 1, 2, 3, 4, 3])
    delta = np.array([-0.01, -0.001, -0.002, -0.002, -0.0005, 0.001])
    se = np.full(6, 0.001)
    codes = verdict.sequential_verdict(n, delta, se, 5)
    assert list(codes) == [int(verdict.sequential_verdict(a, b, c, 5)) for a, b, c in zip(n, delta, se)]
    assert codes[-1] == verdict.DISCARD_CODE and codes[0] == verdict.KEEP_CODE


def test_runs_under_two_torch_releases_are_in_different_pools():
    """torch's major.minor is part of the pool: identical records under 2.11 and 2.15 are not
    comparable (pool_changes names the releases), while two patch releases of 2.15 pool together."""
    def run(run_id, torch_version, val):
        return {"run_id": run_id, "train_sha256": "a", "seed": 42, "val_bpb": val,
                "status": "keep", "device": "NVIDIA H100 80GB HBM3", "time_budget_s": 300.0,
                "harness_hash": "h", "data": {"manifest_hash": "m"},
                "torch_version": torch_version}
    old, new = run("r1", "2.11.0", 1.0), run("r2", "2.15.0+cu132", 0.99)
    assert verdict.comparable_key(old) != verdict.comparable_key(new)
    assert verdict.pool_changes(new, old) == ["torch '2.11' -> '2.15'"]
    assert verdict.pools([old, new], verdict.comparable_key(new)) == {"a": [new]}
    assert verdict.same_seed_run([old], new) is None  # same code and seed, another release
    patch = {**run("r3", "2.15.1+cu132", 0.995), "seed": 43}
    assert verdict.pool_changes(patch, run("r4", "2.15.0", 1.0)) == []
    assert verdict.pools([new, patch], verdict.comparable_key(patch)) == {"a": [new, patch]}


def test_the_standard_error_counts_the_seeds_a_candidate_shares_with_the_best():
    # sigma 0.002, 2 candidate runs, 3 of the best, both candidate seeds shared, rho 0.6:
    # sqrt(1/2 + 1/3 - 2 * 0.6 * 2 / 6) = sqrt(0.43333...) = 0.658281...
    assert verdict.paired_se(0.002, 2, 3, 2, 0.6) == pytest.approx(0.002 * 0.6582805886)
    assert verdict.paired_se(0.002, 2, 3, 0, 0.6) == pytest.approx(0.002 * math.sqrt(5 / 6))
    assert verdict.paired_se(0.002, 2, 3, 2, None) == pytest.approx(0.002 * math.sqrt(5 / 6))
    noise = {"sigma": 0.002, "df": 10, "n_groups": 3, "trusted": True}
    best = [1.0, 1.002, 0.998]
    unpaired = verdict.decide([0.9985, 0.9975], best, noise)
    paired = verdict.decide([0.9985, 0.9975], best, noise, shared_seeds=2, rho=0.6)
    assert (unpaired["shared_seeds"], unpaired["rho"]) == (0, None)
    assert (paired["shared_seeds"], paired["rho"]) == (2, 0.6)
    assert paired["delta"] == unpaired["delta"] and paired["se"] < unpaired["se"]
    assert paired["p_value"] < unpaired["p_value"]


# The single-run paired threshold (policy "paired", the default): hand-computed cases.
# best = [1.0, 1.002, 0.998]: mean 1.0, squares 0 + 4e-6 + 4e-6 on 2 df, sigma = 0.002. Student's t
# on 2 df has the closed form CDF(t) = 1/2 + t / (2 sqrt(2 + t^2)).
PAIRED_BEST = [1.0, 1.002, 0.998]


def t2_cdf(t: float) -> float:
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


def test_one_run_under_the_bests_seed_is_kept_on_the_paired_threshold():
    """Candidate 0.9975 (delta -0.0025) under a seed the best ran with, store rho 0.5:
    se = 0.002 sqrt(1 + 1/3 - 2 * 0.5 * 1 / 3) = 0.002, z = -1.25,
    p = 1/2 - 1.25 / (2 sqrt(3.5625)) = 0.168867 < paired_alpha 0.2, rho 0.5 >= 0.4: kept on 1 run.
    Validated (no paired threshold) reruns it: p > keep_alpha 0.1, below the futility bound 0.2."""
    policy = verdict.POLICIES["paired"]
    assert (policy["paired_alpha"], policy["paired_rho"], policy["paired_runs"]) == (0.2, 0.4, 1)
    assert verdict.VERDICT_MODE == "paired"
    noise = verdict.noise_estimate([PAIRED_BEST])
    d = verdict.decide([0.9975], PAIRED_BEST, noise, shared_seeds=1, rho=0.5)
    assert d["se"] == pytest.approx(0.002)
    assert d["p_value"] == pytest.approx(0.5 - 1.25 / (2 * math.sqrt(3.5625)))
    assert d["p_value"] == pytest.approx(0.168867, abs=1e-6)
    assert d["verdict"] == "keep" and d["paired_keep"] and "PAIRED THRESHOLD" in d["reason"]
    old = verdict.decide([0.9975], PAIRED_BEST, noise, shared_seeds=1, rho=0.5,
                         policy=verdict.POLICIES["validated"])
    assert old["verdict"] == "rerun" and not old.get("paired_keep")


def test_the_paired_threshold_needs_the_stores_rho_and_the_bests_seeds():
    """The same run with the store's rho 0.3 < 0.4: se = 0.002 sqrt(4/3 - 0.2) = 0.0021292,
    z = -1.174158, p = 0.180606: below 0.2, but rho is too low to trust one run: rerun. Under a seed
    the best never ran (shared 0): se = 0.002 sqrt(4/3) = 0.0023094, z = -1.082532, p = 0.196085:
    not paired, rerun. A run of 0.998 (z = -1 at rho 0.5): p = 1/2 - 1/(2 sqrt 3) = 0.211325 is
    above both the paired threshold and the first futility bound: discard."""
    noise = verdict.noise_estimate([PAIRED_BEST])
    low_rho = verdict.decide([0.9975], PAIRED_BEST, noise, shared_seeds=1, rho=0.3)
    assert low_rho["se"] == pytest.approx(0.002 * math.sqrt(4 / 3 - 0.2))
    assert low_rho["p_value"] == pytest.approx(t2_cdf(-0.0025 / (0.002 * math.sqrt(4 / 3 - 0.2))))
    assert low_rho["p_value"] == pytest.approx(0.180606, abs=1e-6)
    assert low_rho["verdict"] == "rerun"
    unshared = verdict.decide([0.9975], PAIRED_BEST, noise, shared_seeds=0, rho=0.5)
    assert unshared["p_value"] == pytest.approx(t2_cdf(-1.25 / math.sqrt(4 / 3)))
    assert unshared["p_value"] == pytest.approx(0.196085, abs=1e-6)
    assert unshared["verdict"] == "rerun"
    no_rho = verdict.decide([0.9975], PAIRED_BEST, noise, shared_seeds=1, rho=None)
    assert no_rho["verdict"] == "rerun"
    weak = verdict.decide([0.998], PAIRED_BEST, noise, shared_seeds=1, rho=0.5)
    assert weak["p_value"] == pytest.approx(0.5 - 1 / (2 * math.sqrt(3)))
    assert weak["verdict"] == "discard"


def test_the_paired_threshold_counts_only_a_candidate_whose_every_run_is_paired():
    """paired_eligible by hand: n runs, shared seeds, rho against paired_runs 1 and paired_rho 0.4;
    a policy without paired_alpha is never eligible; sequential_verdict on arrays agrees."""
    policy = verdict.POLICIES["paired"]
    n = np.array([1, 2, 2, 1, 1])
    shared = np.array([1, 2, 1, 1, 0])
    rho = np.array([0.4, 0.9, 0.9, 0.39, 0.9])
    eligible = verdict.paired_eligible(n, shared, rho, policy)
    assert list(eligible) == [True, True, False, False, False]
    assert not verdict.paired_eligible(1, 1, 0.9, verdict.POLICIES["validated"])
    delta, se = np.full(5, -0.0025), np.full(5, 0.002)  # p = 0.168867 on 2 df, as above
    codes = verdict.sequential_verdict(n, delta, se, 2, policy, shared, rho)
    # not eligible: 1 run rerun (p < futility 0.2), 2 runs discarded (p >= futility 0.1)
    assert list(codes) == [verdict.KEEP_CODE, verdict.KEEP_CODE, verdict.DISCARD_CODE,
                           verdict.RERUN_CODE, verdict.RERUN_CODE]


def test_analysis_md_says_a_keep_came_from_the_paired_threshold():
    """The verdict section of analysis.md carries decide()'s reason and the policy's paired row."""
    from analysis import report
    noise = verdict.noise_estimate([PAIRED_BEST])
    d = verdict.decide([0.9975], PAIRED_BEST, noise, shared_seeds=1, rho=0.5)
    text = "\n".join(report._verdict_section({"decision": d, "record": {"status": "keep"}}))
    assert "**KEEP** — better than the best beyond the noise on the PAIRED THRESHOLD" in text
    assert "the store's rho = 0.50 >= 0.4" in text
    assert "| keep on the paired threshold | p below 0.2 on 1+ run(s)" in text
    assert "(this keep: yes)" in text
