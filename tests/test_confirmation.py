"""The end-of-night confirmation's estimate and interval (analysis/confirmation.py), by hand."""

import numpy as np
import pytest

from analysis import confirmation

# Student's t quantiles from tables: 0.975 on 1 df and on 10 df; the normal's 0.975
T975_1DF, T975_10DF, Z975 = 12.7062047, 2.2281389, 1.9599640

BEST, BASELINE = [0.990, 0.994], [1.000, 1.002]  # gains 0.010 and 0.008 under fresh seeds 1 and 2


def test_the_pairs_own_spread_gives_t_on_k_minus_1_df():
    """Mean gain 0.009; sd of (0.010, 0.008) = 0.002 / sqrt 2, se = that / sqrt 2 = 0.001;
    half-width 12.7062 * 0.001."""
    c = confirmation.confirmed_gain(BEST, BASELINE)
    assert c["estimate"] == pytest.approx(0.009)
    assert c["se"] == pytest.approx(0.001)
    assert c["low"] == pytest.approx(0.009 - T975_1DF * 0.001, abs=1e-9)
    assert c["high"] == pytest.approx(0.009 + T975_1DF * 0.001, abs=1e-9)
    assert (c["n"], c["df"], c["survived"]) == (2, 1.0, True)


def test_the_nights_pooled_sigma_and_rho_give_a_narrower_interval():
    """sigma 0.002 on 10 df, rho 0.75, K = 2: se = 0.002 sqrt(2 * 0.25 / 2) = 0.001, t on 10 df;
    without df, the normal; without rho, sqrt(2 / 2) = 1: se = 0.002."""
    c = confirmation.confirmed_gain(BEST, BASELINE, sigma=0.002, df=10, rho=0.75)
    assert c["se"] == pytest.approx(0.001)
    assert (c["low"], c["high"]) == (pytest.approx(0.009 - T975_10DF * 0.001, abs=1e-9),
                                     pytest.approx(0.009 + T975_10DF * 0.001, abs=1e-9))
    normal = confirmation.confirmed_gain(BEST, BASELINE, sigma=0.002, rho=0.75)
    assert normal["high"] == pytest.approx(0.009 + Z975 * 0.001, abs=1e-9) and normal["df"] == 0
    unpaired = confirmation.confirmed_gain(BEST, BASELINE, sigma=0.002, df=10)
    assert unpaired["se"] == pytest.approx(0.002)


def test_a_lead_that_did_not_survive_and_a_single_pair():
    """The best ran 0.001 worse than the baseline on average: estimate -0.001, not survived. One
    pair has no spread: no interval without sigma."""
    lost = confirmation.confirmed_gain([1.002, 1.001], [1.0, 1.001])
    assert lost["estimate"] == pytest.approx(-0.001) and lost["survived"] is False
    one = confirmation.confirmed_gain([0.99], [1.0])
    assert one["estimate"] == pytest.approx(0.01) and one["low"] is None and one["high"] is None
    assert one["n"] == 1
    with pytest.raises(ValueError):
        confirmation.confirmed_gain([0.99, 0.98], [1.0])


def test_arrays_of_nights_give_each_nights_answer():
    """bench/night_sim.py passes one row per night: the rows' answers are the scalar ones."""
    best = np.array([BEST, [1.002, 1.001]])
    base = np.array([BASELINE, [1.0, 1.001]])
    c = confirmation.confirmed_gain(best, base, sigma=np.array([0.002, 0.002]),
                                    df=np.array([10, 0]), rho=np.array([0.75, 0.0]))
    for row in range(2):
        one = confirmation.confirmed_gain(best[row], base[row], sigma=0.002, df=[10, 0][row],
                                          rho=[0.75, 0.0][row])
        assert c["estimate"][row] == pytest.approx(one["estimate"])
        assert c["low"][row] == pytest.approx(one["low"])
        assert c["high"][row] == pytest.approx(one["high"])
    assert list(c["survived"]) == [True, False]
