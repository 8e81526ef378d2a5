"""
Which worker a command acts for. A night of several workers gives each a git worktree whose store is
a link to the night's (night/workers.py: .worktrees/<name>, branch autoresearch/<tag>-<name>) and
sets $AUTORESEARCH_WORKER for its agent's commands. A command typed by hand in such a worktree
lacks that variable, yet must act on that worker's runs (keep its latest run, record its run as
its), never on the main worker's: so where the variable does not name a worker, a linked worktree
whose store is a link is the worker it is named after. Anywhere else it is the main worker.
"""

from functools import lru_cache
from pathlib import Path

from harness import git, settings
from analysis.store import STORE_DIR


@lru_cache(maxsize=1)
def current() -> str:
    """This command's worker (computed once: the working directory does not change)."""
    if settings.WORKER != settings.MAIN_WORKER:
        return settings.WORKER
    return shared_worktree() or settings.MAIN_WORKER


def shared_worktree():
    """The name of the linked git worktree the command runs in, where its store is a link (a
    worker's worktree of a night); None in a repository's main worktree, in a worktree with a store
    of its own, and outside git."""
    if not Path(STORE_DIR).is_symlink() or not git.is_repo():
        return None
    out = git.git("rev-parse", "--git-dir", "--git-common-dir", "--show-toplevel").splitlines()
    git_dir, common, top = (Path(line).resolve() for line in out)
    return Path(top).name if git_dir != common else None
