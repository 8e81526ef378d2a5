"""bench/bench_pairing.py's fixed-step clock, on real tiny CPU runs: a run ends after exactly the
steps asked, and two runs under the same SEED give the same val_bpb, so that the noise the benchmark
measures at a fixed step count is the seed's alone."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_pairing  # noqa: E402

STEPS = 5


def test_a_fixed_step_run_is_the_seeds_alone(prepared, tmp_path):
    code = bench_pairing.write_code(tmp_path / "code", bench_pairing.fixed_steps(STEPS))
    first, again, other = (bench_pairing.one_run(code, bench_pairing.FIXED_BUDGET_S, seed)
                           for seed in (1, 1, 2))
    assert first["num_steps"] == again["num_steps"] == other["num_steps"] == STEPS
    assert first["val_bpb"] == again["val_bpb"]
    assert other["val_bpb"] != first["val_bpb"]
