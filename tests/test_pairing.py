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
