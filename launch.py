"""
Runs train.py where this night trains (fixed harness: the agent never edits it). program.md's one
training command, whatever the launcher:

    uv run launch.py                     # SEED=43 uv run launch.py for another seed

It takes the run lock first (a second launch while a run trains is refused and touches nothing),
then writes run.log itself (everything the run prints, also shown here), so no shell redirect is
needed; `uv run launch.py > run.log 2>&1` still writes each line once.

- `local` (the default): train.py runs in this directory and the number comes from the harness's
  evaluator, a clean process train.py never ran in (harness/runner.py): train.py serves its model's
  logits, the evaluator alone holds the targets, and once train.py and every process it left have
  ended launch.py writes val_bpb into run_summary.json and seals it. (`uv run train.py` alone
  trains the same way but its number is unsealed, for debugging only.)
- `slurm` (AUTORESEARCH_LAUNCHER=slurm; `supervise.py --launcher slurm --partition P --gres gpu:1`
  sets it for the agents): the run is one Slurm batch job (harness/slurm.py) in this directory,
  launch.py's local launcher on a node that shares the filesystem (the repository, its worktrees
  and $AUTORESEARCH_CACHE). Its output is copied into run.log as it is written; however the job
  ends, the last line says how (`launcher: slurm job 12 ended CANCELLED (...)`) and analyze.py
  records a job that did not complete as a `crash` (or `timeout`) with that line. A pre-empted job
  is submitted again, once. SIGTERM or Ctrl-C cancels the job and waits for its end.

Under a boxed night (supervise.py) neither happens in the agent's box: launch.py asks the night's
runner (AUTORESEARCH_RUN_SOCKET, harness/nightrun.py), which runs this same command outside the
box, with train.py in a box of its own, and streams the run back; it reads the same to the agent.

Settings: AUTORESEARCH_SLURM_PARTITION, AUTORESEARCH_SLURM_GRES (default gpu:1; empty for none),
AUTORESEARCH_SLURM_ARGS (more sbatch options), AUTORESEARCH_SLURM_PENDING_S (default 600).
"""

import os
import sys
from pathlib import Path

from harness import nightrun, runner, settings, slurm
from harness.contract import PRIVATE_UMASK, RUN_LOG, TRAIN_PY, HarnessError


def refuse(error: HarnessError) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    os.umask(PRIVATE_UMASK)  # run.log, the run's files and its seal: this user's only
    here = Path.cwd()
    if not Path(TRAIN_PY).exists():
        print(f"error: no train.py in {here}: run launch.py in the repository (or worktree) "
              f"root", file=sys.stderr)
        return 1
    if settings.RUN_SOCKET and not settings.IN_SLURM_JOB:  # the night trains it, outside the box
        return nightrun.ask("launch.py", args, settings.RUN_SOCKET)
    try:
        if settings.IN_SLURM_JOB:  # on the node: the launch.py that submitted the job holds
            return runner.launch(args, here)  # the lock and run.log
        lock = runner.lock_run(here)  # before run.log is touched: a second run is refused
    except HarnessError as e:
        return refuse(e)
    with lock, runner.run_log(here / RUN_LOG):
        try:
            if settings.LAUNCHER == "local":
                return runner.launch(args, here)
            return slurm.launch(args, here)
        except HarnessError as e:  # into run.log, where analyze.py finds it
            return refuse(e)


if __name__ == "__main__":
    sys.exit(main())
