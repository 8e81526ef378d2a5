"""
Runs train.py where this night trains (fixed harness: the agent must not edit it). program.md's one
training command, whatever the launcher:

    uv run launch.py > run.log 2>&1                 # SEED=43 uv run launch.py ... for another seed

- `local` (the default): it becomes `python train.py` in this directory (exec: the same process, the
  same output), exactly as `uv run train.py > run.log 2>&1`.
- `slurm` (AUTORESEARCH_LAUNCHER=slurm; `supervise.py --launcher slurm --partition P --gres gpu:1` sets it
  for the agents): train.py runs as one Slurm batch job (analysis/slurm.py) in this directory, on a node
  that shares the filesystem (the repository, its worktrees and $AUTORESEARCH_CACHE). Its output is
  copied here as it is written, so run.log is the same; however the job ends, the last line says how
  (`launcher: slurm job 12 ended CANCELLED (reason ..., exit code 0:15, ...)`) and analyze.py records a
  job that did not complete as a `crash` (or `timeout`) with that line. A pre-empted job is submitted
  again, once. SIGTERM or Ctrl-C cancels the job and waits for its end (train.py writes its crash summary).

Settings (environment): AUTORESEARCH_SLURM_PARTITION, AUTORESEARCH_SLURM_GRES (default gpu:1; empty for
none), AUTORESEARCH_SLURM_ARGS (more sbatch options), AUTORESEARCH_SLURM_PENDING_S (cancel a job still
pending after this long; default 600).
"""

import math
import os
import signal
import sys
from pathlib import Path

from analysis import slurm
from analysis.store import current_worker
from prepare import WATCHDOG_S

LAUNCHER_ENV = "AUTORESEARCH_LAUNCHER"
LAUNCHERS = ("local", "slurm")
SLURM_ENV = {"partition": "AUTORESEARCH_SLURM_PARTITION", "gres": "AUTORESEARCH_SLURM_GRES",
             "extra": "AUTORESEARCH_SLURM_ARGS", "pending_s": "AUTORESEARCH_SLURM_PENDING_S"}
DEFAULT_GRES = "gpu:1"
SLURM_TIME_MARGIN_S = 120  # Slurm's limit lies beyond train.py's own watchdog, which ends a hung run first and
                           # says so; the scheduler's kill is the outer bound


def say(text: str):
    print(f"{slurm.LAUNCHER_PREFIX}{text}", flush=True)


def slurm_settings(environ) -> dict:
    settings = {key: environ.get(name) for key, name in SLURM_ENV.items()}
    if settings["gres"] is None:
        settings["gres"] = DEFAULT_GRES
    raw = settings["pending_s"]
    try:
        settings["pending_s"] = float(raw) if raw else slurm.DEFAULT_PENDING_S
        if not settings["pending_s"] > 0:
            raise ValueError
    except ValueError:
        raise SystemExit(f"error: {SLURM_ENV['pending_s']}={raw!r} is not a positive number of seconds")
    return settings


def run_slurm(args: list, environ) -> int:
    settings = slurm_settings(environ)
    run_dir = Path.cwd()
    stop = {"asked": False}

    def on_signal(signum, frame):
        stop["asked"] = True  # follow() cancels the job and waits for its end

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    time_limit = math.ceil((WATCHDOG_S + SLURM_TIME_MARGIN_S) / 60)
    worker = current_worker(environ)[0]
    command = slurm.sbatch_command(settings, run_dir, sys.executable, args, time_limit, f"autoresearch-{worker}")
    for attempt in range(slurm.MAX_REQUEUES + 1):
        try:
            job = slurm.submit(command)
        except slurm.LaunchError as e:
            say(f"slurm job - ended BOOT_FAIL (never submitted: {e})")
            return 1
        say(f"submitted slurm job {job} ({' '.join(command[2:-1])})")
        tail = slurm.OutputTail(run_dir / f".slurm-{job}.out", sys.stdout.buffer)
        try:
            fields = slurm.follow(job, tail, settings["pending_s"], lambda: stop["asked"])
        except slurm.LaunchError as e:  # scancel failed: the job may still run, and only a person can tell
            tail.line(f"{slurm.LAUNCHER_PREFIX}slurm job {job} ended UNKNOWN (lost track of it: {e}; "
                      f"check it with `scontrol show job {job}`, end it with `scancel {job}`)")
            return 1
        (run_dir / f".slurm-{job}.out").unlink(missing_ok=True)
        state = slurm.job_state(fields)
        if state in slurm.REQUEUE_STATES and attempt < slurm.MAX_REQUEUES and not stop["asked"]:
            tail.line(f"{slurm.LAUNCHER_PREFIX}slurm job {job} was {state} ({tail.notice or 'no notice'}): "
                      f"submitting the run again, once")
            continue
        tail.line(slurm.outcome_line(job, fields, tail.notice))
        return slurm.exit_code(fields)
    return 1  # not reached: the last attempt always returns


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    launcher = os.environ.get(LAUNCHER_ENV) or "local"
    if launcher not in LAUNCHERS:
        print(f"error: {LAUNCHER_ENV}={launcher!r} is not a launcher (one of: {', '.join(LAUNCHERS)})", file=sys.stderr)
        return 1
    if not Path("train.py").exists():
        print(f"error: no train.py in {Path.cwd()}: run launch.py in the repository (or worktree) root", file=sys.stderr)
        return 1
    if launcher == "local":
        os.execv(sys.executable, [sys.executable, "train.py", *args])
    return run_slurm(args, os.environ)


if __name__ == "__main__":
    sys.exit(main())
