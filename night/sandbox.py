"""
The agent's box (bubblewrap): what the agent's CLI, and every command it runs, can see and change.

Inside the box the whole filesystem is read-only; /tmp is private and empty; /proc shows the box's
own PID namespace only (no process of the night outside it, no other worker's), and every process
in it ends when the box's first process (the CLI, or one command of the api backend) ends, so
nothing of a session outlives it. Writable: the worktree, minus the fixed files
(contract.FIXED_PATHSPECS), the virtual environment, the project's pyproject.toml / uv.lock and
the store, which are bound read-only over it; in the store, its notes folder (the agents' notes,
analysis/store.py), bound read-write again; git's folder (commits), minus its hooks and config,
which would run code in the night's own git commands; and what the caller adds (the CLI's
config). The store's ledger, archive, claims and morning report are written by analyze.py, which
the night's runner runs for the agent outside the box, as it runs launch.py.
Where the Python environment, the commands on PATH, the prepare cache or the Slurm client's folder
are under /tmp, they stay visible, read-only. Every capability is dropped, so a root agent cannot
remount any of it.

The box has a network of its own with loopback only: its one way out is the night's key proxy
(night/keyproxy.py), whose Unix socket its stopper relays to box.RELAY_URL inside it (a claude CLI
given no key, which uses its own login, keeps the host's network). Its training
runs, and every analyze.py command it gives, are the night's runner's (night/runs.py), whose
socket is bound into it: the prepare cache, the seals included, is read-only to the agent.
"""

from pathlib import Path

from analysis.store import NOTES_DIR, SANDBOX_LOG, UNBOXED, Store
from harness import box as boxes, contract, git

NO_SANDBOX = "--no-sandbox"
NOT_WANTED = f"{NO_SANDBOX} was given"


def git_folder(repo: Path) -> Path:
    """git's own folder of the worktree `repo` (a worker's is its repository's .git)."""
    return (repo / git.git("rev-parse", "--git-common-dir", cwd=repo).strip()).resolve()


def writable_paths(repo: Path) -> list:
    """What the agent may change: the worktree and git's folder. Not the prepare cache's seals:
    its runs are the night's."""
    repo = Path(repo).resolve()
    return [p for p in (repo, git_folder(repo)) if p.exists()]


def store_folder(repo: Path) -> Path:
    """The store the worktree writes through (a worker's is a link to the night's), made where
    missing, with its notes folder."""
    store = Store(repo)
    store.notes_folder()
    return store.dir.resolve()


def notes_paths(repo: Path) -> list:
    """Writable again inside the read-only store: its notes folder (insights.md, ideas_queue.md,
    each run's notes)."""
    return [store_folder(repo) / NOTES_DIR]


def read_only_paths(repo: Path) -> list:
    """Bound read-only over the writable ones: the fixed files, the environment, the store, git's
    hooks and config (each existing one; the hooks folder is made, so that none can be added)."""
    repo = Path(repo).resolve()
    common = git_folder(repo)
    (common / "hooks").mkdir(exist_ok=True)
    paths = [repo / p for p in (*contract.FIXED_PATHSPECS, *boxes.ENVIRONMENT)]
    paths += [store_folder(repo), common / "hooks", common / "config"]
    return [p for p in paths if p.exists() or p.is_symlink()]


def read_only(repo: Path, target: Path) -> bool:
    """Whether the box holds `target` (a resolved path in the worktree) read-only."""
    def under(folder):
        return folder == target or folder in target.parents
    return (any(map(under, read_only_paths(repo)))
            and not any(map(under, notes_paths(repo))))


def box(command: list, repo: Path, writable=(), python: str = None, isolated: bool = True,
        relay: Path = None, runner: Path = None) -> list:
    """`command` run in the agent's box for the worktree `repo`; `writable`: more paths the
    command may change (the CLI's config); `relay`: the key proxy's socket (harness/box.py);
    `runner`: the folder of the night's runner (night/runs.py), which trains and seals the runs."""
    writable = [*writable_paths(repo), *(Path(p).resolve() for p in writable)]
    shown = [Path(runner)] if runner is not None else []
    return boxes.command(command, Path(repo), writable=writable,
                         read_only=[*read_only_paths(repo), *shown],
                         reopened=notes_paths(repo), isolated=isolated, relay=relay,
                         **({"python": python} if python else {}))


def network(isolated: bool) -> str:
    """The box's network, in the words of the night's start line and sandbox.log."""
    return ("network: the API only" if isolated else
            "network: the host's (the CLI's own login needs it; --key-file closes it)")


def record(store, unboxed, isolated: bool):
    """Note in the store whether the night's agent runs in its box (`unboxed`: why not)."""
    state = f"{UNBOXED}: {unboxed}" if unboxed else f"boxed (bubblewrap; {network(isolated)})"
    with open(store.path(SANDBOX_LOG), "a") as f:
        f.write(f"{contract.stamp()} | {state}\n")
