"""The simulated night (bench/night_sim.py) in seconds: the project's rule keeps at most 1 idea without a real
gain per night and beats the rule before issue 11 on true gain, on fixed seeds; and its vectorised rules decide
exactly as the scalar decide() does."""

import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import night_sim  # noqa: E402

NIGHTS = 300           # enough for the bounds below to hold by a wide margin on these seeds, in about a second
SIGMAS = (0.0003, 0.0013, 0.003)
MAX_FALSE_KEEPS = 1.0  # the bound, per night of 100 runs


@pytest.mark.parametrize("prior", ["base", "scarce", "rich"])
def test_the_project_rule_bounds_false_keeps_and_beats_todays_rule(prior):
    streams = night_sim.draw_streams(night_sim.PRIORS[prior], NIGHTS, 100, seed=11)
    for sigma in SIGMAS:
        out = {name: night_sim.summarize(night_sim.simulate(night_sim.RULES[name], streams, sigma, 100, 3), 100, 3)
               for name in ("today", "project")}
        assert out["project"]["false_keeps"] <= MAX_FALSE_KEEPS, (prior, sigma, out)
        assert out["project"]["true_gain_mbpb"] > out["today"]["true_gain_mbpb"], (prior, sigma, out)


def test_the_vectorised_rules_decide_as_decide_does():
    pytest.importorskip("scipy")
    try:
        night_sim.today_module()
    except (subprocess.CalledProcessError, FileNotFoundError) as e:  # a checkout without that history (or git)
        pytest.skip(f"git show {night_sim.TODAY_COMMIT} unavailable: {e}")
    mismatches, checked = night_sim.check(3, [0.0013], 100, 3, seed=5)
    assert checked > 500 and mismatches == []
