"""Seed pairing's statistics (analysis/pairing.py) on values worked out by hand, and on planted
noise whose shared part is known."""

import numpy as np
import pytest

from analysis import pairing


def test_a_difference_the_seed_explains_whole_is_rho_1_and_opposite_effects_are_negative():
    # the same seed effect in both codes: the paired difference is a constant 1
    assert pairing.seed_share([1, 2, 3, 4], [2, 3, 4, 5]) == 1.0
    # opposite effects: differences 3, 1, -1, -3 (variance 20/3) against 5/3 + 5/3
    assert pairing.seed_share([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # a shared effect s as large as an opposite one e: first = s + e, second = s - e with
    # s = (0, 0, 2, 2), e = (0, 2, 0, 2) gives first (0, 2, 2, 4), second (0, -2, 2, 0):
    # differences (0, -4, 0, -4), variance 16/3, against 8/3 + 8/3
    assert pairing.seed_share([0, 2, 2, 4], [0, -2, 2, 0]) == pytest.approx(0.0)


def test_the_planted_share_is_recovered_and_independent_seeds_share_nothing():
    rng = np.random.default_rng(7)
    n, rho = 4000, 0.6
    seed_effect = rng.normal(0, rho ** 0.5, n)
    first = 1.0 + seed_effect + rng.normal(0, (1 - rho) ** 0.5, n)
    second = 0.9 + seed_effect + rng.normal(0, (1 - rho) ** 0.5, n)  # a real gain of 0.1
    assert pairing.seed_share(first, second) == pytest.approx(rho, abs=0.04)
    assert pairing.unpaired_share(first, second) == pytest.approx(0.0, abs=0.05)
    low, high = pairing.seed_share_interval(first[:12], second[:12], draws=2000)
    assert low < high and low < pairing.seed_share(first[:12], second[:12]) < high


def test_too_few_runs_or_no_noise_is_one_clear_error():
    with pytest.raises(ValueError, match="at least 2 runs"):
        pairing.seed_share([1.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 runs"):
        pairing.seed_share([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="without any noise"):
        pairing.seed_share([1.0, 1.0], [2.0, 2.0])
    # two seeds give rho-hat, but every bootstrap draw with spread is the point itself
    assert pairing.seed_share([2.359, 2.388], [2.343, 2.368]) == pytest.approx(0.990, abs=0.001)
    with pytest.raises(ValueError, match="needs 3 seeds or more, not 2"):
        pairing.seed_share_interval([2.359, 2.388], [2.343, 2.368])


def runs(code, values, first_seed=42, params=1.5):
    return [{"code": code, "seed": first_seed + j, "val_bpb": v, "num_params_M": params}
            for j, v in enumerate(values)]


def test_the_stores_share_pairs_every_idea_with_the_bests_runs_of_the_same_seed():
    groups = {"best": runs("best", [1.00, 1.02, 0.98]),
              # differences to the best's seeds 42, 43, 44: 0.01, 0.01, 0.01 (no spread)
              "a": runs("a", [1.01, 1.03, 0.99]),
              # seeds 42, 43: differences -0.02, 0.00 (squares about their mean: 2 * 0.01^2)
              "b": runs("b", [0.98, 1.02]),
              "c": runs("c", [0.9]),                  # one run: no spread to measure
              "d": runs("d", [1.1, 1.2], first_seed=7),  # seeds the best never ran under
              # a wider model: its seeds draw other initial weights, so it pairs with nothing
              "e": runs("e", [1.3, 0.8, 1.0], params=2.25)}
    share = pairing.store_share(groups, "best", sigma=0.02)
    # df = 2 (a) + 1 (b); Var = 0.0002 / 3; raw = 1 - Var / (2 * 0.0004) = 11/12
    assert share["df"] == 3 and share["codes"] == 2
    assert share["raw"] == pytest.approx(11 / 12)
    assert share["rho"] == pytest.approx(11 / 12 * 3 / (3 + pairing.SHRINK_DF))


def test_runs_pair_on_the_seeds_they_share_when_their_shapes_agree():
    best = runs("best", [1.0, 1.0, 1.0])                     # seeds 42, 43, 44
    assert pairing.shared_seeds(runs("a", [1.0, 1.0]), best) == 2
    assert pairing.shared_seeds(runs("a", [1.0, 1.0], first_seed=44), best) == 1  # 44 and 45
    assert pairing.shared_seeds(runs("a", [1.0, 1.0], params=1.75), best) == 0
    assert pairing.shared_seeds(runs("a", [1.0], first_seed=7), best) == 0
    assert not pairing.same_shapes({"num_params_M": None}, {"num_params_M": None})


def test_the_stores_share_is_none_without_pairs_or_sigma_and_never_below_0():
    groups = {"best": runs("best", [1.0, 1.1]), "a": runs("a", [1.3])}
    assert pairing.store_share(groups, "best", sigma=0.05) == {
        "rho": None, "raw": None, "df": 0, "codes": 0}
    groups["a"] = runs("a", [1.2, 0.9])  # differences 0.2, -0.2: far noisier than sigma says
    share = pairing.store_share(groups, "best", sigma=0.01)
    assert share["raw"] < 0 and share["rho"] == 0.0
    assert pairing.store_share(groups, "best", sigma=None)["rho"] is None
