"""
The whole GPU measurement of train.py on a bare GPU machine, as one command under a wall-clock
deadline (a lent GPU comes with minutes, not hours): only a Python with torch is needed (no uv, no
network). In order, each step only while the deadline (--deadline-s, default 540 s from the start)
leaves room for it:

1. install: unpacks the wheels it is given (--wheels DIR: rustbpe and whatever else the machine
   lacks) into a private folder, without pip or the network.
2. prepare: the offline smoke-test corpus into --cache (or reuses the prepared cache found there).
3. main: train.py as it is, for the full budget (--budget, default the harness's 300 s).
4. pair: the same file with and without its instrumentation, each for a shorter budget
   (--pair-budget, default 30 s): what the instrumentation costs.
5. sdpa: every attention layer through SDPA instead of flex_attention, for the same short budget.
6. pairing (only when --steps names it): the baseline and one small change (MATRIX_LR x 1.1, as
   bench/bench_pairing.py) under the same seeds 1..--pairing-seeds, each for --pairing-budget
   seconds of the time budget as the loop runs, seed by seed; then rho-hat, the share of the run
   noise two runs under one SEED have in common (issue 21), from the seeds both codes finished.
7. summary: each target met or not: MFU, overhead, peak VRAM and compilation from the main run,
   the instrumentation's cost from the pair, rho-hat from the pairing.

--steps chooses which of main, pair, sdpa and pairing run (default main,pair,sdpa: the pairing
needs a device command of its own, e.g. `--steps pairing`).

A run is started only if its training budget, plus its overhead, plus a safety margin end before
the deadline. Its overhead (wall - training seconds) is what the last run of the same variant
measured, since the first run of a code compiles it and the later ones find the compile cache warm;
before its first run, the largest measured by any run; before any run, an assumed one. Otherwise
a line says it was skipped and why. A run still going near the deadline is killed; a failed run writes its error and the check goes on with what still fits. Every line is
printed and appended to --out, flushed, the moment it exists: a check cut short leaves every
finished result.

Usage:
    python3 bench/gpu_check.py --wheels .whl --out bench/results/gpu-check-<device>-<date>.jsonl
    python3 bench/gpu_check.py --wheels .whl --steps pairing --out bench/results/...jsonl
Standard library only, so it runs before anything is installed.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_variants import (  # noqa: E402
    ROOT, SMALL_CHANGES, VARIANTS, RunFailed, run_train, write_variant)
from harness import contract, settings  # noqa: E402  (standard library only; ROOT is on the path)

# The targets for a 5-minute H100 run (BENCHMARKS.md)
TARGET_MFU_PERCENT = 40.0          # autoresearch publishes 39.8 % with FlashAttention-3
TARGET_INSTRUMENTATION_PERCENT = 1.0
TARGET_OVERHEAD_S = 20.0           # total - training seconds, compilation included
TARGET_PEAK_VRAM_MB = 80 * 1024    # the default DEVICE_BATCH_SIZE must fit an 80 GB card
TARGET_EVALUATOR_S = 60.0          # the evaluator's final evaluation, a process of its own (issue 19)

DEFAULT_DEADLINE_S = 540      # one device command may run 10 minutes: the last one is left for the
                              # interpreter, the results' transfer and a step that overruns
DEFAULT_PAIR_BUDGET_S = 30    # hundreds of steady steps on an H100, enough for a step-rate ratio;
                              # short, so that the pair (and sdpa) fit after the 300 s run
ASSUMED_OVERHEAD_S = 90       # wall - training seconds of a run before one has been measured: a
                              # first GPU run compiles model, evaluation and optimizer (target 20 s)
SAFETY_MARGIN_S = 20          # between a run's expected end and the deadline: the spread of the
                              # overhead from one run to the next (evaluation, compilation)
KILL_RESERVE_S = 5            # a run still going this close to the deadline is killed, leaving time
                              # for its line and the summary
PAIR = ("instrumented", "uninstrumented")
STEPS = ("main", "pair", "sdpa", "pairing")
DEFAULT_STEPS = "main,pair,sdpa"
DEFAULT_PAIRING_SEEDS = 4      # rho-hat's interval narrows as 1 / sqrt(seeds). A run's wall time is
                               # its budget + ~106 s on an H200 (2026-12-04, a cold compile cache),
                               # so 9 minutes hold 2 seeds cold; the rest is skipped, saying why
DEFAULT_PAIRING_BUDGET_S = 30  # hundreds of steps on an H100: past the loss's steep start
PAIRING_CHANGE = "matrix_lr_x1.1"  # of SMALL_CHANGES: it keeps the weights' shapes, so seeds pair
PAIRING_CODES = ("pairing-baseline", f"pairing-{PAIRING_CHANGE}")


def install_wheels(wheel_dir: Path, target: Path) -> dict:
    """Unpack every wheel in wheel_dir into target (what `pip install --target` does for a wheel,
    without pip or the network); returns the environment under which train.py sees them."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"error: no .whl files in {wheel_dir}")
    target.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)
    relocated = [*target.glob("*.data/purelib"), *target.glob("*.data/platlib")]
    for lib in relocated:  # a wheel's libraries under its .data folder belong at the top
        for item in lib.iterdir():
            shutil.move(str(item), target / item.name)
    print(f"installed {len(wheels)} wheel(s) into {target}", file=sys.stderr)
    paths = (str(target), os.environ.get("PYTHONPATH"))
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}


class Check:
    """One check: its deadline, where its lines go, the environment of its runs, what each step
    came to and the overheads its runs measured, by variant."""

    def __init__(self, out, started: float, deadline_s: float):
        self.started, self.deadline = started, started + deadline_s  # time.monotonic() seconds
        self.stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")  # names this check's lines in --out
        self.file = None
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(out, "a")
        self.env, self.runs, self.outcomes = {}, {}, {}
        self.overheads = {}  # variant -> the overheads (wall - training seconds) its runs measured
        self.sources = {}  # variant -> the folder its runs are copied from
        self.pairing = None  # the pairing step's line, once written

    def close(self):
        if self.file:
            self.file.close()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def write(self, line: dict) -> dict:
        """Print the line and append it to --out, flushed: it is there for whoever reads next."""
        line = {**line, "check": self.stamp, "host": platform.node(),
                "elapsed_s": round(time.monotonic() - self.started, 1)}
        text = json.dumps(line)
        print(text, flush=True)
        if self.file:
            self.file.write(text + "\n")
            self.file.flush()
        return line

    def fail(self, step: str, why: str, **extra):
        """A step nothing after it can do without: its error line, then exit 1."""
        self.write({"step": step, "error": why, **extra})
        raise SystemExit(f"error: gpu check: {step}: {why}")

    def overhead(self, variant: str = None) -> tuple:
        """(seconds, how known) a run of `variant` is expected to spend beyond its training budget:
        what its own last run measured (a code's first run compiles it, the later ones find its
        graphs in the compile cache: 85 s, then 22 s on an H200), else the largest any run
        measured, else the assumed one."""
        own = self.overheads.get(variant)
        if own:
            return own[-1], f"measured by {variant}'s last run"
        if self.overheads:
            return max(max(v) for v in self.overheads.values()), "measured"
        return ASSUMED_OVERHEAD_S, "assumed"

    def fits(self, step: str, budget: float, runs: int = 1, variant: str = None) -> bool:
        """Whether `runs` runs of `budget` training seconds (of `variant`) end before the deadline,
        by their expected overhead; if not, a line says the step is skipped and why."""
        overhead, known = self.overhead(variant)
        needs, left = runs * (budget + overhead) + SAFETY_MARGIN_S, self.left()
        if needs <= left:
            return True
        self.outcomes[step] = "skipped"
        self.write({"step": step, "skipped": step, "needs_s": round(needs), "left_s": round(left),
                    "why": f"needs ~{needs:.0f} s: {runs} x ({budget:g} s training + "
                           f"{overhead:.0f} s overhead, {known}) "
                           f"+ {SAFETY_MARGIN_S} s margin; {left:.0f} s left before the deadline"})
        return False

    def run(self, step: str, variant: str, budget: float, seed: int = None):
        """One run of a variant (under SEED `seed`, if given): its line, with every figure or
        with its error."""
        head = {"step": step, "variant": variant, "budget_s": budget}
        env = self.env if seed is None else {**self.env, "SEED": str(seed)}
        if seed is not None:
            head["seed"] = seed
        try:
            run, _ = run_train(self.sources[variant], budget, env,
                               timeout=self.left() - KILL_RESERVE_S)
        except RunFailed as e:
            self.outcomes[step] = "failed"
            self.write({**head, "error": str(e), "stderr_tail": e.stderr_tail,
                        "stdout_tail": e.stdout_tail})
            return None
        self.outcomes[step], self.runs[step] = "ran", run
        self.overheads.setdefault(variant, []).append(run["wall_seconds"] - run["training_seconds"])
        self.write({**head, **run})
        return run


def install(check: Check, wheel_dir: Path):
    """Step 1: the wheels unpacked into a private folder, on the runs' PYTHONPATH."""
    t0 = time.monotonic()
    target = Path(tempfile.mkdtemp(prefix="alr-site-"))
    try:
        check.env.update(install_wheels(wheel_dir, target))
    except (zipfile.BadZipFile, OSError) as e:
        check.fail("install", f"cannot unpack the wheels in {wheel_dir}: {e}")
    check.write({"step": "install", "wheels": sorted(p.name for p in wheel_dir.glob("*.whl")),
                 "into": str(target), "seconds": round(time.monotonic() - t0, 1)})


def prepare(check: Check, cache: Path):
    """Step 2: the offline corpus prepared into cache, unless a prepared one is there."""
    t0 = time.monotonic()
    reused = (cache / contract.MANIFEST).exists()
    if not reused:
        env = {**os.environ, **check.env, settings.CACHE_ENV: str(cache)}
        timeout = check.left() - KILL_RESERVE_S
        try:
            proc = subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--offline"], env=env,
                                  capture_output=True, text=True, timeout=max(timeout, 0))
        except subprocess.TimeoutExpired:
            check.fail("prepare", f"prepare.py still running after {timeout:.0f} s: killed at "
                                  f"the deadline")
        print(proc.stdout, end="", file=sys.stderr)  # stdout holds only the check's lines
        if proc.returncode != 0:
            check.fail("prepare", f"prepare.py --offline failed (exit {proc.returncode})",
                       stderr_tail=proc.stderr[-4000:])
    check.env[settings.CACHE_ENV] = str(cache)
    check.write({"step": "prepare", "cache": str(cache), "reused": reused,
                 "seconds": round(time.monotonic() - t0, 1)})


def pairing(check: Check, seeds: int, budget: float):
    """Step 6: the baseline and the small change under seeds 1..seeds, seed by seed (a check cut
    short still pairs what it has), then a `pairing` line with rho-hat over the seeds both
    finished."""
    values = {code: {} for code in PAIRING_CODES}
    for seed in range(1, seeds + 1):
        for code in PAIRING_CODES:
            step = f"{code}-seed{seed}"
            if check.fits(step, budget, variant=code):
                run = check.run(step, code, budget, seed=seed)
                if run:
                    values[code][seed] = run["val_bpb"]
    both = sorted(set(values[PAIRING_CODES[0]]) & set(values[PAIRING_CODES[1]]))
    line = {"step": "pairing", "seeds_paired": both, "budget_s": budget, "rho": None}
    if len(both) < 2:
        line["why"] = f"rho-hat needs 2 seeds that both codes finished; {len(both)} did"
    else:
        from analysis import pairing as seed_pairing  # numpy: installed once the check gets here
        first, second = ([values[code][s] for s in both] for code in PAIRING_CODES)
        line["val_bpb"] = dict(zip(PAIRING_CODES, (first, second)))
        try:
            line["rho"] = seed_pairing.seed_share(first, second)
        except ValueError as e:  # runs without any spread: rho is undefined, and the line says so
            line["why"] = str(e)
        try:
            line["rho_interval_95"] = list(seed_pairing.seed_share_interval(first, second))
        except ValueError as e:  # too few seeds for an interval (or no spread): the line says so
            line["rho_interval_95"], line["interval_why"] = None, str(e)
    check.pairing = check.write(line)


def target(value, met) -> dict:
    """A target's measured value and whether it is met (None: not measured)."""
    return {"value": value, "met": None if value is None else met(value)}


def summarise(check: Check) -> dict:
    """The instrumentation's cost (from the pair), SDPA against flex_attention and each target:
    the main run's speed, overhead, memory and compilation, the pair's instrumentation cost."""
    main, on, off, sdpa = (check.runs.get(s) for s in ("main", "pair-instrumented",
                                                        "pair-uninstrumented", "sdpa"))
    cost = 100 * (off["steps_per_s"] / on["steps_per_s"] - 1) if on and off else None
    flex_step = "pair-instrumented" if on else "main"  # the same budget as sdpa's, where it ran
    flex = check.runs.get(flex_step)
    versus = sdpa["steps_per_s"] / flex["steps_per_s"] if sdpa and flex else None
    compiled = main and [main["graph_breaks"], main["graphs_in_loop"], main["recompiles_in_loop"]]
    return {
        "step": "summary", "steps": check.outcomes, "instrumentation_cost_percent": cost,
        "pairing_rho": check.pairing and check.pairing["rho"],
        "sdpa_vs_flex_steps_per_s": versus,
        "sdpa_compared_with": None if versus is None else flex_step,
        "targets": {
            f"mfu >= {TARGET_MFU_PERCENT:g} %": target(
                main and main["mfu_percent"], lambda v: v >= TARGET_MFU_PERCENT),
            f"overhead <= {TARGET_OVERHEAD_S:g} s": target(
                main and main["overhead_seconds"], lambda v: v <= TARGET_OVERHEAD_S),
            "peak VRAM <= 80 GB": target(
                main and main["peak_vram_mb"], lambda v: v <= TARGET_PEAK_VRAM_MB),
            "no graph break, nothing compiled on the clock": target(
                compiled if compiled and None not in compiled else None,
                lambda v: v == [0, 0, 0]),
            f"evaluator <= {TARGET_EVALUATOR_S:g} s": target(
                main and main["evaluator_seconds"], lambda v: v <= TARGET_EVALUATOR_S),
            f"instrumentation <= {TARGET_INSTRUMENTATION_PERCENT:g} %": target(
                cost, lambda v: v <= TARGET_INSTRUMENTATION_PERCENT),
        },
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description="The whole GPU measurement of train.py as one "
                                     "command under a wall-clock deadline (see its docstring).")
    parser.add_argument("--wheels", type=Path, help="folder of .whl files to install first "
                                                    "(offline)")
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "alr-gpu-check-cache",
                        help="prepare cache: reused when it holds a manifest, else the offline "
                             "corpus is prepared into it")
    parser.add_argument("--budget", type=float, default=settings.DEFAULT_TIME_BUDGET_S,
                        help="training seconds of the main run (default %(default)s)")
    parser.add_argument("--pair-budget", type=float, default=DEFAULT_PAIR_BUDGET_S,
                        help="training seconds of each pair run and of sdpa's (default "
                             "%(default)s)")
    parser.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S,
                        help="wall seconds from the start by which the check ends (default "
                             "%(default)s)")
    parser.add_argument("--steps", default=DEFAULT_STEPS,
                        help=f"which of {', '.join(STEPS)} to run, comma-separated, in the "
                             f"check's order (default %(default)s)")
    parser.add_argument("--pairing-seeds", type=int, default=DEFAULT_PAIRING_SEEDS,
                        help="seeds of the pairing step (default %(default)s)")
    parser.add_argument("--pairing-budget", type=float, default=DEFAULT_PAIRING_BUDGET_S,
                        help="training seconds of each pairing run (default %(default)s)")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    for name in ("budget", "pair_budget", "deadline_s", "pairing_budget"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive number of seconds")
    args.steps = args.steps.split(",")
    unknown = sorted(set(args.steps) - set(STEPS))
    if unknown:
        parser.error(f"--steps: unknown step(s) {', '.join(unknown)}; the steps are "
                     f"{', '.join(STEPS)}")
    if args.pairing_seeds < 2:
        parser.error("--pairing-seeds must be at least 2: rho-hat needs a spread over seeds")
    return args


def run_steps(check: Check, args):
    """The steps in order, each run only if it still fits before the deadline."""
    if args.wheels:
        install(check, args.wheels)
    prepare(check, args.cache)
    if "main" in args.steps and check.fits("main", args.budget):
        check.run("main", "instrumented", args.budget)
    if "pair" in args.steps and check.fits("pair", args.pair_budget, runs=len(PAIR)):
        for variant in PAIR:
            if check.fits(f"pair-{variant}", args.pair_budget, variant=variant):
                check.run(f"pair-{variant}", variant, args.pair_budget)
    if "sdpa" in args.steps and check.fits("sdpa", args.pair_budget):
        check.run("sdpa", "sdpa", args.pair_budget)
    if "pairing" in args.steps:
        pairing(check, args.pairing_seeds, args.pairing_budget)
    check.write(summarise(check))


def main(argv=None) -> int:
    started = time.monotonic()  # the deadline counts from here: only standard imports before it
    args = parse_args(argv)
    check = Check(args.out, started, args.deadline_s)
    try:
        with tempfile.TemporaryDirectory() as d:
            for variant in VARIANTS:  # all now: a stale one stops the check at once
                check.sources[variant] = write_variant(Path(d, variant), variant)
            for code, edits in zip(PAIRING_CODES, ({}, SMALL_CHANGES[PAIRING_CHANGE])):
                check.sources[code] = write_variant(Path(d, code), "instrumented", edits,
                                                    owner="bench/gpu_check.py")
            run_steps(check, args)
    finally:
        check.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
