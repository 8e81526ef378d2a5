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
6. summary: each target met or not: MFU, overhead, peak VRAM and compilation from the main run,
   the instrumentation's cost from the pair.

A run is started only if its training budget, plus the largest overhead a run has measured so far
(wall - training seconds; before the first, an assumed one), plus a safety margin end before the
deadline; otherwise a line says it was skipped and why. A run still going near the deadline is
killed; a failed run writes its error and the check goes on with what still fits. Every line is
printed and appended to --out, flushed, the moment it exists: a check cut short leaves every
finished result.

Usage:
    python3 bench/gpu_check.py --wheels .whl --out bench/results/gpu-check-<device>-<date>.jsonl
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
from train_variants import ROOT, VARIANTS, RunFailed, run_train, write_variant  # noqa: E402
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
    came to and the overheads its runs measured."""

    def __init__(self, out, started: float, deadline_s: float):
        self.started, self.deadline = started, started + deadline_s  # time.monotonic() seconds
        self.stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")  # names this check's lines in --out
        self.file = None
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(out, "a")
        self.env, self.runs, self.outcomes, self.overheads = {}, {}, {}, []
        self.sources = {}  # variant -> the folder its runs are copied from

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

    def fits(self, step: str, budget: float, runs: int = 1) -> bool:
        """Whether `runs` runs of `budget` training seconds end before the deadline, by the largest
        overhead measured so far; if not, a line says the step is skipped and why."""
        measured = bool(self.overheads)
        overhead = max(self.overheads) if measured else ASSUMED_OVERHEAD_S
        needs, left = runs * (budget + overhead) + SAFETY_MARGIN_S, self.left()
        if needs <= left:
            return True
        self.outcomes[step] = "skipped"
        self.write({"step": step, "skipped": step, "needs_s": round(needs), "left_s": round(left),
                    "why": f"needs ~{needs:.0f} s: {runs} x ({budget:g} s training + "
                           f"{overhead:.0f} s overhead, {'measured' if measured else 'assumed'}) "
                           f"+ {SAFETY_MARGIN_S} s margin; {left:.0f} s left before the deadline"})
        return False

    def run(self, step: str, variant: str, budget: float):
        """One run of a variant: its line, with every figure or with its error."""
        head = {"step": step, "variant": variant, "budget_s": budget}
        try:
            run, _ = run_train(self.sources[variant], budget, self.env,
                               timeout=self.left() - KILL_RESERVE_S)
        except RunFailed as e:
            self.outcomes[step] = "failed"
            self.write({**head, "error": str(e), "stderr_tail": e.stderr_tail,
                        "stdout_tail": e.stdout_tail})
            return None
        self.outcomes[step], self.runs[step] = "ran", run
        self.overheads.append(run["wall_seconds"] - run["training_seconds"])
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
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    for name in ("budget", "pair_budget", "deadline_s"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive number of seconds")
    return args


def run_steps(check: Check, args):
    """The steps in order, each run only if it still fits before the deadline."""
    if args.wheels:
        install(check, args.wheels)
    prepare(check, args.cache)
    if check.fits("main", args.budget):
        check.run("main", "instrumented", args.budget)
    if check.fits("pair", args.pair_budget, runs=len(PAIR)):
        for variant in PAIR:
            if check.fits(f"pair-{variant}", args.pair_budget):
                check.run(f"pair-{variant}", variant, args.pair_budget)
    if check.fits("sdpa", args.pair_budget):
        check.run("sdpa", "sdpa", args.pair_budget)
    check.write(summarise(check))


def main(argv=None) -> int:
    started = time.monotonic()  # the deadline counts from here: only standard imports before it
    args = parse_args(argv)
    check = Check(args.out, started, args.deadline_s)
    try:
        with tempfile.TemporaryDirectory() as d:
            for variant in VARIANTS:  # all now: a stale one stops the check at once
                check.sources[variant] = write_variant(Path(d, variant), variant)
            run_steps(check, args)
    finally:
        check.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
