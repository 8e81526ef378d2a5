"""
What the evaluator costs (issue 19): the wall time and peak memory of launch.py's evaluator, the
process train.py never runs in, per run, from real runs of train.py as it is (launch.py, a short
training budget), on whatever device this machine has. The evaluator times itself from the
model's first served batch to its last answer, and reports its peak memory (the GPU's allocations,
or its own RSS on a CPU); launch.py writes both into run_summary.json["evaluator"].

Usage (the prepare cache must be prepared: `uv run prepare.py`, or --offline for the smoke corpus):
    uv run bench/bench_evaluator.py --repeats 3 --budget 5 \
        --out bench/results/evaluator-cpu-<date>.json
"""

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import envelope, write_result  # noqa: E402
from train_variants import ROOT, run_train  # noqa: E402

DEFAULT_BUDGET_S = 5.0   # training seconds per run: the evaluation does not depend on them
DEFAULT_REPEATS = 3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    runs = []
    for _ in range(args.repeats):
        _, summary = run_train(ROOT, args.budget)
        evaluator = summary["evaluator"]
        runs.append({"seconds": evaluator["seconds"], "peak_memory_mb": evaluator["peak_memory_mb"],
                     "rows": evaluator["rows"], "batch_size": evaluator["batch_size"],
                     "train_process_s": evaluator["train_process_s"],
                     "device": summary["device"], "torch": summary["torch_version"]})
        print(runs[-1], flush=True)
    seconds = [r["seconds"] for r in runs]
    result = {**envelope(__file__), "budget_s": args.budget, "runs": runs,
              "median_s": statistics.median(seconds), "max_s": max(seconds),
              "max_peak_memory_mb": max(r["peak_memory_mb"] for r in runs)}
    write_result(result, args.out)
    print(f"evaluator: median {result['median_s']:.1f} s, max {result['max_s']:.1f} s, peak "
          f"{result['max_peak_memory_mb']:.0f} MB over {len(runs)} runs on {runs[0]['device']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
