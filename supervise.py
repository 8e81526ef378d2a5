"""
The unattended overnight loop: keeps an agent running experiments (program.md) until a deadline,
an experiment budget or a stop rule, and leaves the store and git consistent however it ends.

    uv run supervise.py --backend claude --hours 8   # your Claude Code, restarted whenever it exits
    uv run supervise.py --backend codex --hours 8    # your Codex CLI, likewise
    uv run supervise.py --backend api --hours 8      # a built-in agent on the Anthropic API

No state lives only in an agent's context: every restart (claude, codex) or experiment (api) starts
fresh from program.md, insights.md, ideas_queue.md and results.tsv. A training run that exceeds its
wall-clock limit is killed. A stop rule lets the experiment in progress finish (up to
--stop-grace), then the supervisor ends every process of the night and settles the last run (keep
or discard), so git and the ledger agree. With a deadline, its last stretch (--confirm-minutes)
is the confirmation: the supervisor runs the night's best and its starting baseline on fresh
seeds for an honest morning number (night/confirm.py). Progress: `tail -f
.auto-log-research/status.log`; every agent session's output and tool call is in
.auto-log-research/supervisor.log; the morning report, .auto-log-research/report.html, is
rewritten after every change of the ledger. This file is the command line; the night/ package is
the loop.
"""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

# The settings this night and its runs use, read and checked once: a bad AUTORESEARCH_* value ends
# the supervisor here with one `error:` line.
from harness import proc, settings
from analysis import claims
from harness.contract import PRIVATE_UMASK, TRAIN_PY
from night import api, claude, codex, confirm, environment, rules, sandbox, sessions
from night.supervisor import PROGRAM, REPORT, Supervisor
from night.workers import run_workers, worker_argv, worker_names


def agent_options(agent):
    """The options of the agent: its command, what it may see, its key and its box."""
    agent.add_argument("--claude-command", default=claude.DEFAULT_CLAUDE_COMMAND,
                       help="the claude backend's command; program.md (then a resume prompt) "
                            "goes to its stdin")
    agent.add_argument("--codex-command", default=codex.DEFAULT_CODEX_COMMAND,
                       help="the codex backend's command, likewise (add -m MODEL, -c KEY=VALUE)")
    agent.add_argument("--pass-env", type=lambda s: {n for n in s.split(",") if n}, default=set(),
                       help="comma-separated names of other environment variables the agent may "
                            "see (default: none)")
    agent.add_argument("--restart-delay", type=float, default=sessions.RESTART_DELAY_S,
                       help="seconds before a restart")
    agent.add_argument("--model", default=api.DEFAULT_MODEL, help="model of the api backend")
    agent.add_argument("--key-file", metavar="PATH",
                       help=f"the API key, from this file (mode 600) rather than "
                            f"{environment.KEY_ENV} ({environment.OPENAI_KEY_ENV} for codex), "
                            f"which `uv` keeps in its environment all night")
    agent.add_argument(sandbox.NO_SANDBOX, action="store_true",
                       help="run the agent outside its bubblewrap box (README, 'Threat model')")


def parser() -> argparse.ArgumentParser:
    limits = settings.LIMITS
    top = argparse.ArgumentParser(prog="supervise.py", description=__doc__.split("\n\n")[0].strip(),
                                  allow_abbrev=False)  # worker_argv removes options by their names
    top.add_argument("--backend", choices=("claude", "codex", "api"), required=True)
    top.add_argument("--hours", type=float,
                     help="stop after this many hours (default: no deadline)")
    top.add_argument("--confirm-minutes", type=float,
                     help=f"the night's last minutes, in which the supervisor runs the best and "
                          f"the night's starting baseline on fresh seeds for the morning's "
                          f"headline (default {confirm.DEFAULT_CONFIRM_MINUTES} where --hours is "
                          f"at least {confirm.SHORT_NIGHT_FACTOR} times that; 0: none)")
    top.add_argument("--max-experiments", type=int,
                     help="stop after this many new runs in the ledger")
    top.add_argument("--max-crashes", type=int, default=3,
                     help="stop after this many crashed runs in a row")
    top.add_argument("--max-without-keep", type=int,
                     help="stop after this many runs in a row without a keep")
    top.add_argument("--max-hours-without-keep", type=float,
                     help="stop after this many hours without a keep")
    top.add_argument("--max-outage-hours", type=float, default=sessions.DEFAULT_MAX_OUTAGE_H,
                     help=f"stop after the API or the agent failed this long (default "
                          f"{sessions.DEFAULT_MAX_OUTAGE_H:g})")
    top.add_argument("--train-timeout", type=float, default=limits["kill_s"],
                     help=f"wall-clock seconds after which a training run is killed (default "
                          f"{limits['kill_s']:.0f}: train.py's watchdog, "
                          f"{limits['watchdog_s']:.0f} s, + {settings.KILL_MARGIN_S} s; never "
                          f"below the watchdog's)")
    top.add_argument("--stop-grace", type=float,
                     help=f"seconds a stop rule waits for the experiment in progress to finish "
                          f"(default: the training limit + {settings.TOOL_MARGIN_S})")
    agent_options(top.add_argument_group("the agent"))
    night = top.add_argument_group("several workers, one store and one best (README: 'An 8-GPU "
                                   "node')")
    night.add_argument("--gpus", help="one worker per GPU, e.g. 0,1,2,3: each in its own git "
                                      "worktree and branch")
    night.add_argument("--workers", type=int,
                       help="this many workers without pinning GPUs (with --launcher slurm)")
    night.add_argument("--tag", default=time.strftime("%b%d").lower(),
                       help="the workers' branches are autoresearch/<tag>-<worker> (default: "
                            "today, e.g. dec01)")
    slurm = top.add_argument_group("training on Slurm (README: 'A Slurm cluster')")
    slurm.add_argument("--launcher", choices=settings.LAUNCHERS, default=None,
                       help="where `uv run launch.py` trains: here (local, the default) or as "
                            "Slurm jobs")
    slurm.add_argument("--partition", help="the Slurm partition of the training jobs")
    slurm.add_argument("--gres", help=f"the jobs' generic resources (default "
                                      f"{settings.DEFAULT_GRES}; '' for none)")
    slurm.add_argument("--slurm-args", help="more sbatch options, e.g. '--account=A --qos=Q'")
    for internal in ("--worker", "--night"):  # set by a night of workers for each of them
        top.add_argument(internal, help=argparse.SUPPRESS)
    top.add_argument("--night-rows", type=int, help=argparse.SUPPRESS)
    top.add_argument(environment.KEY_FD_FLAG, type=int, help=argparse.SUPPRESS)
    return top


def option_problem(args):
    """What is wrong with the night's options, in one line, or None."""
    if args.train_timeout <= settings.WATCHDOG_S:
        return (f"--train-timeout {args.train_timeout:g} must exceed train.py's watchdog "
                f"({settings.WATCHDOG_S:.0f} s, {settings.WATCHDOG_ENV}), which records a hung "
                f"run as `timeout` before anything kills it")
    minutes = args.confirm_minutes
    if minutes is not None and minutes < 0:
        return f"--confirm-minutes {minutes:g} must be at least 0"
    if minutes is not None and args.hours and minutes >= args.hours * 60:
        return (f"--confirm-minutes {minutes:g} must be shorter than the night (--hours "
                f"{args.hours:g}: {args.hours * 60:g} minutes)")
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    names = worker_names(args)
    problem = option_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.stop_grace is None:
        args.stop_grace = args.train_timeout + settings.TOOL_MARGIN_S
    repo = Path.cwd()
    if not (repo / PROGRAM).exists() or not (repo / TRAIN_PY).exists():
        print(f"error: run supervise.py in the repository root (no {PROGRAM} / train.py in {repo})",
              file=sys.stderr)
        return 2
    try:  # the key leaves the environment here
        secret = environment.handed_over_key(args.key_fd, args.key_file, __file__, argv,
                                             environment.key_env(args.backend))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if secret:  # the supervisor's memory, where the key stays, closed to the user's other processes
        proc.undumpable()
    if args.backend == "api" and not secret:
        print(f"error: --backend api needs an API key: --key-file PATH (a file readable by you "
              f"only) or {environment.KEY_ENV} in the environment", file=sys.stderr)
        return 2
    os.umask(PRIVATE_UMASK)  # the logs, the store and what the agent writes: this user's only
    environment.launcher_environment(args, os.environ)
    if args.worker:  # its commands' claims and ledger rows
        os.environ[settings.WORKER_ENV] = args.worker
    sup = Supervisor(args, repo, secret=secret)
    if args.worker:  # its idea claims live as long as this process (analysis/claims.py)
        life = f"{args.worker}-{os.getpid()}-{int(time.time())}"
        sup.life = proc.hold_life(sup.store.path(claims.LIVES_DIR) / life)
        os.environ[settings.WORKER_LIFE_ENV] = life
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # under nohup, a closed terminal goes on
            signal.signal(sig, sup.on_signal)
    other = sup.running_night()
    if other:
        print(f"error: a night is already running in this repository (supervise.py pid {other}); "
              f"stop it first (kill {other}) or run in another clone", file=sys.stderr)
        return 2
    sup.begin()
    slurm = (args.launcher or settings.LAUNCHER) == "slurm"
    sup.status(f"started (pid {os.getpid()}; stop rules: {rules.describe_rules(sup.rules)}"
               + (f"; {len(names)} workers" if names else "")
               + ("; training on Slurm" if slurm else "")
               + (f"; {sup.confirm_note}" if sup.confirm_note else "")
               + (f"; agent {sandbox.UNBOXED}: {sup.unboxed}" if sup.unboxed else
                  f"; the agent in its box, {sandbox.network(sup.isolated)}" if not names else "")
               + (f"; morning report: {REPORT})" if not args.worker else ")"))
    if names:
        return run_workers(sup, names, worker_argv(argv))
    backends = {"claude": claude.run_claude, "codex": codex.run_codex, "api": api.run_api}
    return backends[args.backend](sup)


if __name__ == "__main__":
    sys.exit(main())
