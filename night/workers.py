"""
A night of several workers: one agent per GPU (--gpus) or per Slurm job slot (--workers), each in
a git worktree and branch of its own, all on one store and one best.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import git, proc, settings
from harness.contract import HarnessError
from analysis import claims
from analysis.store import STORE_DIR, worker_of
from night import rules
from night.environment import KEY_FD_FLAG, key_pipe
from night.supervisor import POLL_S, Supervisor

WORKTREES = ".worktrees"             # the workers' git worktrees, in the repository (gitignored)

# the night's; a worker gets every other option as given
WORKER_OPTIONS = ("--gpus", "--workers", "--tag")


def worker_names(args) -> list:
    """[(name, CUDA_VISIBLE_DEVICES or None)] of the night's workers; [] for a night with one
    agent."""
    if args.gpus is not None:
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
        if not gpus or len(set(gpus)) != len(gpus) or not all(g.isdigit() for g in gpus):
            raise SystemExit(f"error: --gpus {args.gpus!r} is not a list of distinct GPU indices, "
                             f"e.g. --gpus 0,1,2,3")
        return [(f"gpu{g}", g) for g in gpus]
    if args.workers is not None:
        if args.workers < 1:
            raise SystemExit(f"error: --workers {args.workers} is not a positive number of workers")
        return [(f"w{i}", None) for i in range(args.workers)] if args.workers > 1 else []
    return []


def worker_argv(argv: list) -> list:
    """The command line a worker gets: the night's, without the options that make it a night of
    workers."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in WORKER_OPTIONS:
            skip = True
        elif not any(arg.startswith(f"{o}=") for o in WORKER_OPTIONS):
            out.append(arg)
    return out


class Workers:
    """A night of several workers. Each gets a git worktree of the repository (.worktrees/<name>,
    branch autoresearch/<tag>-<name>) whose .auto-log-research is the repository's store, so every
    run, keep and claim of every worker is in one ledger under one lock, and `discard` or `sync` in
    any worktree restores the one best. Each worker is a supervise.py of its own in its worktree
    (`--worker`), with its GPU as CUDA_VISIBLE_DEVICES; this process starts them, passes signals on,
    rewrites the morning report, releases the idea claims of a worker that ended, and removes the
    worktrees at the end (their branches stay)."""

    def __init__(self, sup: Supervisor, names: list, argv: list):
        self.sup, self.names, self.argv = sup, names, argv
        self.repo = sup.repo.resolve()
        self.procs = {}                      # name -> Popen
        self.ended = {}                      # name -> exit code

    def worktree(self, name: str) -> Path:
        return self.repo / WORKTREES / name

    def branch(self, name: str) -> str:
        return f"autoresearch/{self.sup.args.tag}-{name}"

    def prepare(self):
        """Create (or reuse, for a night resumed with the same --tag) each worker's branch and
        worktree."""
        registered = git.git("worktree", "list", "--porcelain", cwd=self.repo)
        changed = git.changed_paths(self.repo)
        if changed:
            self.sup.status(f"note: the workers start from the last commit; the uncommitted "
                            f"changes here ({', '.join(changed[:3])}) are not in their worktrees")
        for name, _ in self.names:
            path, branch = self.worktree(name), self.branch(name)
            if f"worktree {path}\n" in registered + "\n":
                pass  # a resumed night: the worktree is still there
            elif git.git("branch", "--list", branch, cwd=self.repo).strip():
                git.git("worktree", "add", "--quiet", str(path), branch, cwd=self.repo)
            else:
                git.git("worktree", "add", "--quiet", "-b", branch, str(path), "HEAD",
                        cwd=self.repo)
            link = path / STORE_DIR
            if link.exists() and not link.is_symlink():
                raise HarnessError(f"{link} is a folder of its own, not the link to the night's "
                                   f"store {self.sup.store.dir.resolve()}: move it away, then "
                                   f"start the night again")
            if not link.is_symlink():
                link.symlink_to(self.sup.store.dir.resolve(), target_is_directory=True)

    def start(self):
        sup = self.sup
        venv = self.repo / ".venv"
        for index, (name, gpu) in enumerate(self.names):
            env = {**os.environ, settings.WORKER_ENV: name, settings.WORKER_INDEX_ENV: str(index),
                   settings.NIGHT_ENV: sup.night,
                   # its baseline run's SEED (program.md)
                   settings.WORKER_SEED_ENV: str(settings.BASELINE_SEED + index)}
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            if venv.is_dir() and "UV_PROJECT_ENVIRONMENT" not in env:
                # one environment for all: `uv run` in a worktree uses it
                env["UV_PROJECT_ENVIRONMENT"] = str(venv)
            argv = [*self.argv, "--worker", name, "--night", sup.night,
                    "--night-rows", str(sup.start_rows)]
            pass_fds = ()
            if sup.secret:
                read_end = key_pipe(sup.secret)
                argv += [KEY_FD_FLAG, str(read_end)]
                pass_fds = (read_end,)
            # a night killed outright (SIGKILL, the OOM killer) stops its workers as a signal
            # would: each ends its agent's box, settles its last run and exits
            self.procs[name] = subprocess.Popen(
                [sys.executable, str(self.repo / "supervise.py"), *argv],
                cwd=self.worktree(name), env=env, pass_fds=pass_fds,
                preexec_fn=proc.dies_with_parent(signal.SIGTERM))
            for fd in pass_fds:
                os.close(fd)
            sup.status(f"worker {name} started (pid {self.procs[name].pid}, {self.branch(name)}"
                       + (f", CUDA_VISIBLE_DEVICES={gpu}" if gpu is not None else "") + ")")

    def forward(self, signum):
        for worker in self.procs.values():
            if worker.poll() is None:
                try:
                    worker.send_signal(signum)
                except ProcessLookupError:
                    pass  # it just ended

    def reap(self):
        """Note the workers that ended; release the ideas they had claimed."""
        for name, worker in self.procs.items():
            if name in self.ended or worker.poll() is None:
                continue
            self.ended[name] = worker.returncode
            with self.sup.store.lock():
                updated, released = claims.release_worker(claims.read(self.sup.store), name)
                if released:
                    claims.write(self.sup.store, updated)
            self.sup.status(f"worker {name} ended (exit code {worker.returncode})"
                            + (f"; released its claim on {released} idea(s)" if released else ""))

    def remove_worktrees(self):
        """Remove every worktree with nothing uncommitted (run files are ignored, and archived);
        keep the others and say why. The branches stay: they are the night's history."""
        for name, _ in self.names:
            path = self.worktree(name)
            if not path.exists():
                continue
            (path / STORE_DIR).unlink(missing_ok=True)
            left = git.git("status", "--porcelain", cwd=path).splitlines()
            if left:
                (path / STORE_DIR).symlink_to(self.sup.store.dir.resolve(),
                                              target_is_directory=True)
                self.sup.status(f"kept worktree {path}: it has uncommitted files "
                                f"({', '.join(l[3:] for l in left[:3])})")
                continue
            git.git("worktree", "remove", str(path), cwd=self.repo)
        git.git("worktree", "prune", cwd=self.repo)

    def summary(self) -> str:
        runs = self.sup.new_runs()
        return "; ".join(f"{name} {rules.run_counts([r for r in runs if worker_of(r) == name])}"
                         for name, _ in self.names)


def run_workers(sup: Supervisor, names: list, argv: list) -> int:
    night = Workers(sup, names, argv)
    try:
        night.prepare()
    except HarnessError as e:
        sup.stop(f"cannot create the workers' worktrees: {e}", failed=True)
        print(f"error: {sup.stopping}", file=sys.stderr)
        return sup.finish(settle=False)
    sup.on_forward = night.forward
    night.start()
    while len(night.ended) < len(night.procs):
        night.reap()
        sup._ledger()
        # after every change of the ledger; the stop rules are each worker's to apply
        sup.refresh_report()
        time.sleep(POLL_S)
    night.reap()
    sup.status(f"all {len(names)} workers ended: {night.summary()}")
    night.remove_worktrees()
    if sup.stopping is None:
        sup.stop("every worker stopped",
                 failed=any(code not in (0, 130) for code in night.ended.values()))
    code = sup.finish(settle=False)
    return code if code else (1 if any(c not in (0, 130) for c in night.ended.values()) else 0)
