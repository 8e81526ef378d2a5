"""
The agent's box (bubblewrap): what the agent's CLI, and every command it runs, can see and change.

Inside the box the whole filesystem is read-only; /tmp is private and empty; /proc shows the box's
own PID namespace only (no process of the night outside it, no other worker's), and every process
in it ends when the box's first process (the CLI, or one command of the api backend) ends, so
nothing of a session outlives it. Writable: the worktree, minus the fixed files
(contract.FIXED_PATHSPECS), the virtual environment and the project's pyproject.toml / uv.lock,
which are bound read-only over it; the store; git's folder (commits), minus its hooks and config,
which would run code in the night's own git commands; and what the caller adds (the CLI's
config). The morning report is not bound read-only: the night rewrites it by renaming a new file
over it, which would detach such a binding; its last rewrite comes after the agent has ended.
Where the Python environment, the commands on PATH, the prepare cache or the Slurm client's folder
are under /tmp, they stay visible, read-only. Every capability is dropped, so a root agent cannot
remount any of it.

The box has a network of its own with loopback only: its one way out is the night's key proxy
(night/keyproxy.py), whose Unix socket its stopper relays to box.RELAY_URL inside it (a claude CLI
given no key, which uses its own login, keeps the host's network). Its training
runs are the night's runner's (night/runs.py), whose socket is bound into it: the prepare cache,
the seals included, is read-only to the agent.
"""

from pathlib import Path

from analysis.store import SANDBOX_LOG, STORE_DIR, UNBOXED
from harness import box as boxes, contract, git

NO_SANDBOX = "--no-sandbox"
NOT_WANTED = f"{NO_SANDBOX} was given"


def git_folder(repo: Path) -> Path:
    """git's own folder of the worktree `repo` (a worker's is its repository's .git)."""
    return (repo / git.git("rev-parse", "--git-common-dir", cwd=repo).strip()).resolve()


def writable_paths(repo: Path) -> list:
    """What the agent may change: the worktree, the store it writes through (a worker's is a link
    to the night's) and git's folder. Not the prepare cache's seals: its runs are the night's."""
    repo = Path(repo).resolve()
    paths = [repo, (repo / STORE_DIR).resolve(), git_folder(repo)]
    return [p for p in paths if p.exists()]


def read_only_paths(repo: Path) -> list:
    """Bound read-only over the writable ones: the fixed files, the environment, git's hooks and
    config (each existing one; the hooks folder is made, so that none can be added)."""
    repo = Path(repo).resolve()
    common = git_folder(repo)
    (common / "hooks").mkdir(exist_ok=True)
    paths = [repo / p for p in (*contract.FIXED_PATHSPECS, *boxes.ENVIRONMENT)]
    paths += [common / "hooks", common / "config"]
    return [p for p in paths if p.exists() or p.is_symlink()]


def read_only(repo: Path, target: Path) -> bool:
    """Whether the box holds `target` (a resolved path in the worktree) read-only."""
    return any(p == target or p in target.parents for p in read_only_paths(repo))


def box(command: list, repo: Path, writable=(), python: str = None, isolated: bool = True,
        relay: Path = None, runner: Path = None) -> list:
    """`command` run in the agent's box for the worktree `repo`; `writable`: more paths the
    command may change (the CLI's config); `relay`: the key proxy's socket (harness/box.py);
    `runner`: the folder of the night's runner (night/runs.py), which trains and seals the runs."""
    writable = [*writable_paths(repo), *(Path(p).resolve() for p in writable)]
    shown = [Path(runner)] if runner is not None else []
    return boxes.command(command, Path(repo), writable=writable,
                         read_only=[*read_only_paths(repo), *shown], isolated=isolated,
                         relay=relay, **({"python": python} if python else {}))


def network(isolated: bool) -> str:
    """The box's network, in the words of the night's start line and sandbox.log."""
    return ("network: the API only" if isolated else
            "network: the host's (the CLI's own login needs it; --key-file closes it)")


def record(store, unboxed, isolated: bool):
    """Note in the store whether the night's agent runs in its box (`unboxed`: why not)."""
    state = f"{UNBOXED}: {unboxed}" if unboxed else f"boxed (bubblewrap; {network(isolated)})"
    with open(store.path(SANDBOX_LOG), "a") as f:
        f.write(f"{contract.stamp()} | {state}\n")
