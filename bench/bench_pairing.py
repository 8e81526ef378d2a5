"""
How much of the run-to-run noise pairing seeds cancels (issue 21, item 1): the baseline train.py and
two codes that differ from it by one small change (MATRIX_LR x 1.1; a wider model, ASPECT_RATIO
64 -> 96) are each trained under the same seeds, and rho-hat = 1 - Var(paired difference) /
(2 sigma-hat^2) is reported with a bootstrap interval over seeds (analysis/pairing.py).

Two clocks. With a fixed step count (train.py edited to end, and to schedule its learning rate, by
steps) the noise is the seed's alone: initialisation and data order. With the time budget, as the
loop runs, the number of steps that fit also jitters from run to run; the baseline is run again
under one seed to show that jitter on its own. Every run is a real `launch.py` (train.py beside the
evaluator) on whatever device this machine has; each result is written as soon as it exists.

Usage (the prepare cache must be prepared: `uv run prepare.py`):
    uv run bench/bench_pairing.py --seeds 7 --steps 60 --budget 30 \
        --out bench/results/pairing-cpu-<date>.json
    uv run bench/bench_pairing.py --summarize bench/results/pairing-cpu-<date>.json  # cut short
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import envelope, write_result  # noqa: E402
from train_variants import ROOT, SMALL_CHANGES, run_train, write_variant  # noqa: E402
from analysis import pairing  # noqa: E402

CHANGES = {"baseline": {}, **SMALL_CHANGES}  # the baseline and train_variants' small changes
DEFAULT_SEEDS = 7       # seeds per code: the interval of rho narrows as 1 / sqrt(seeds)
DEFAULT_STEPS = 60      # optimizer steps of a fixed-step run: past the loss's steep start, and
                        # about 30 s each on 2 cores (a run's evaluation and startup take 25 s more)
DEFAULT_BUDGET_S = 30.0  # training seconds of a time-budget run: about the fixed steps on 2 cores
DEFAULT_JITTER_REPEATS = 3  # reruns of the baseline under one seed, time budget
FIXED_BUDGET_S = 3600.0  # the time budget a fixed-step run trains under: never what ends it
FIRST_SEED = 1


def fixed_steps(steps: int) -> dict:
    """train.py's edits that end the run after `steps` optimizer steps and drive its schedules by
    steps, not seconds; no validation-curve points (the final evaluation is the number)."""
    return {"min(training_time / TIME_BUDGET, 1.0)": f"min(step / {steps}, 1.0)",
            "done = step >= CLOCK_WARMUP_STEPS and training_time >= TIME_BUDGET":
                f"done = step + 1 >= {steps}",
            "    if progress >= next_val or done:": "    if False:"}


def write_code(dest: Path, edits: dict) -> Path:
    """The harness in `dest`, with train.py edited by `edits` (old text: new text)."""
    return write_variant(dest, "instrumented", edits, owner="bench/bench_pairing.py")


def one_run(code: Path, budget: float, seed: int) -> dict:
    _, summary = run_train(code, budget, env={"SEED": str(seed)})
    return {"seed": seed, "val_bpb": summary["val_bpb"], "num_steps": summary["num_steps"],
            "training_seconds": summary["training_seconds"]}


def share(runs: dict, a: str, b: str) -> dict:
    """rho-hat of codes a and b over the seeds both ran under, its interval, the independent-seed
    check, and the noise of one run and of a paired and an unpaired difference."""
    first = [r["val_bpb"] for r in runs[a]]
    second = [r["val_bpb"] for r in runs[b]]
    n = min(len(first), len(second))
    first, second = first[:n], second[:n]
    low, high = pairing.seed_share_interval(first, second)
    sigma = ((statistics.variance(first) + statistics.variance(second)) / 2) ** 0.5
    return {"pair": f"{a} vs {b}", "seeds": n, "rho": pairing.seed_share(first, second),
            "rho_interval_95": [low, high],
            "rho_independent_seeds": pairing.unpaired_share(first, second),
            "sigma_one_run": sigma,
            "sd_paired_difference": statistics.stdev(y - x for x, y in zip(first, second)),
            "sd_unpaired_difference": sigma * 2 ** 0.5,
            "mean_difference": statistics.mean(second) - statistics.mean(first)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S)
    parser.add_argument("--jitter-repeats", type=int, default=DEFAULT_JITTER_REPEATS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--summarize", type=Path, metavar="RESULT",
                        help="run nothing: add the shares to a result this script wrote")
    args = parser.parse_args(argv)
    if args.summarize:
        result = json.loads(args.summarize.read_text())
        summarize(result)
        write_result(result, args.summarize)
        return 0
    seeds = list(range(FIRST_SEED, FIRST_SEED + args.seeds))
    result = {**envelope(__file__), "seeds": seeds, "steps": args.steps,
              "budget_s": args.budget, "fixed_steps": {}, "time_budget": {},
              "jitter": [], "shares": {}}
    with tempfile.TemporaryDirectory(prefix="alr-bench-pairing-") as tmp:
        codes = {}
        for clock, base_edits in (("fixed_steps", fixed_steps(args.steps)), ("time_budget", {})):
            for name, change in CHANGES.items():
                if clock == "time_budget" and name == "width_96":
                    continue  # the time budget's jitter shows on the smaller change alone
                codes[clock, name] = write_code(Path(tmp) / clock / name,
                                                {**base_edits, **change})
        for seed in seeds:  # seed by seed, so that a cut-short benchmark still pairs
            for (clock, name), folder in codes.items():
                budget = FIXED_BUDGET_S if clock == "fixed_steps" else args.budget
                run = one_run(folder, budget, seed)
                result[clock].setdefault(name, []).append(run)
                print(f"{clock} {name} seed {seed}: val_bpb {run['val_bpb']:.6f} "
                      f"({run['num_steps']} steps)", flush=True)
                write_result(result, args.out)
        for _ in range(args.jitter_repeats):
            result["jitter"].append(one_run(codes["time_budget", "baseline"], args.budget,
                                            FIRST_SEED))
            write_result(result, args.out)
    summarize(result)
    write_result(result, args.out)
    return 0


def summarize(result: dict):
    """The shares and the same-seed jitter of `result`'s runs, however many seeds it holds (a
    benchmark cut short pairs what it has), added to it and printed."""
    result["shares"] = {}
    for clock in ("fixed_steps", "time_budget"):
        for name in CHANGES:
            if name != "baseline" and len(result[clock].get(name, [])) >= 2:
                result["shares"][f"{clock}: {name}"] = share(result[clock], "baseline", name)
    print(json.dumps(result["shares"], indent=2))
    if result["jitter"]:
        same_seed = [result["time_budget"]["baseline"][0]["val_bpb"]]
        same_seed += [r["val_bpb"] for r in result["jitter"]]
        result["jitter_sd_same_seed"] = statistics.stdev(same_seed)
        print(f"time budget, seed {FIRST_SEED} run {len(same_seed)} times: sd "
              f"{result['jitter_sd_same_seed']:.6f}")


if __name__ == "__main__":
    sys.exit(main())
