"""
The search behind policy `paired` (analysis/verdict.py): the single-run paired threshold's settings
in simulated nights (bench/night_sim.py), each as decide() applies it (the paired standard error,
the seeds shared with the best, the night's own shrunk ρ̂), on top of policy validated.

    uv run bench/night_sim_paired_grid.py                 # the grid at σ = 0.0013, 2,000 nights
    uv run bench/night_sim_paired_grid.py --robust        # chosen settings on every prior and σ

Each cell prints true gain / false keeps per night; the columns are ρ = 0, 0.3, 0.6, 0.88, 0.9 on
paired seeds and ρ = 0.88 on fresh seeds (where no run shares a seed and nothing may change).
"""

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import night_sim  # noqa: E402
from night_sim import verdict  # noqa: E402

CELLS = ((0.0, "paired"), (0.3, "paired"), (0.6, "paired"), (0.88, "paired"), (0.9, "paired"),
         (0.88, "fresh"))
GRID = dict(paired_alpha=(0.01, 0.03, 0.07, 0.15, 0.2, 0.25, 0.3, 0.4),
            paired_rho=(0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5), paired_runs=(1, 2))
# the settings compared on every prior and σ (--robust): the chosen one and its neighbour
ROBUST = {"p0.2/rho0.3/1": dict(paired_alpha=0.2, paired_rho=0.3, paired_runs=1),
          "p0.2/rho0.4/1": dict(paired_alpha=0.2, paired_rho=0.4, paired_runs=1)}


def cell(policy: dict, streams: dict, sigma: float, rho: float, seeds: str) -> str:
    o = night_sim.summarize(night_sim.simulate(night_sim.rule_project_paired(policy), streams,
                                               sigma, 100, 3, rho=rho, seeds=seeds), 100, 3)
    return f"{o['true_gain_mbpb']:.1f}/{o['false_keeps']:.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--nights", type=int, default=2000)
    parser.add_argument("--robust", action="store_true", help="the ROBUST settings, every prior and σ")
    args = parser.parse_args(argv)
    base = verdict.POLICIES["validated"]
    if args.robust:
        for prior in night_sim.PRIORS:
            streams = night_sim.draw_streams(night_sim.PRIORS[prior], args.nights, 100, 7)
            for sigma, rho in itertools.product((0.0003, 0.0013, 0.003), (0.0, 0.88)):
                row = [f"validated {cell(base, streams, sigma, rho, 'paired')}"]
                row += [f"{k} {cell(dict(base, **p), streams, sigma, rho, 'paired')}"
                        for k, p in ROBUST.items()]
                print(prior, sigma, rho, " | ".join(row), flush=True)
        return 0
    streams = night_sim.draw_streams(night_sim.PRIORS["base"], args.nights, 100, 2026)
    print("validated", " ".join(cell(base, streams, 0.0013, r, s) for r, s in CELLS), flush=True)
    for alpha, rho_min, runs in itertools.product(*GRID.values()):
        policy = dict(base, paired_alpha=alpha, paired_rho=rho_min, paired_runs=runs)
        print(alpha, rho_min, runs, " ".join(cell(policy, streams, 0.0013, r, s) for r, s in CELLS),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
