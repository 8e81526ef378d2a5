"""
The git operations of the bookkeeping commands. History is only ever added to (a revert is a new
commit); nothing here resets, checks out over, or deletes anything.
"""

import subprocess
from pathlib import Path

from analysis.store import StoreError

TRAIN_PY = "train.py"


def git(*args, cwd=".", check=True) -> str:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise StoreError("git is not installed; the bookkeeping commands need it") from None
    if check and proc.returncode != 0:
        message = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise StoreError(f"git {' '.join(args)} failed: {message[-1] if message else proc.returncode}")
    return proc.stdout


def is_repo(cwd=".") -> bool:
    return subprocess.run(["git", "rev-parse", "--git-dir"], cwd=cwd, capture_output=True).returncode == 0


def require_repo(cwd="."):
    if not is_repo(cwd):
        raise StoreError(f"{Path(cwd).resolve()} is not a git repository; keep and discard work through git")


def head(cwd=".", short=True):
    if not is_repo(cwd):
        return None
    out = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], cwd=cwd,
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def show(commit: str, path: str = TRAIN_PY, cwd=".") -> str:
    """The text of `path` at `commit`, or None where it does not exist there."""
    if not commit or not is_repo(cwd):
        return None
    proc = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=cwd, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def subject(commit: str, cwd=".") -> str:
    """The first line of a commit's message, or None."""
    if not commit or not is_repo(cwd):
        return None
    proc = subprocess.run(["git", "log", "-1", "--format=%s", commit], cwd=cwd, capture_output=True, text=True)
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def changed_paths(cwd=".") -> list:
    """Tracked files with uncommitted changes, staged or not (untracked files do not count)."""
    out = git("status", "--porcelain", "--untracked-files=no", cwd=cwd)
    return [line[3:].split(" -> ")[-1] for line in out.splitlines() if line.strip()]


def refuse_unsafe_tree(cwd="."):
    """The bookkeeping commands act on train.py only: refuse while anything else is uncommitted."""
    others = [p for p in changed_paths(cwd) if p != TRAIN_PY]
    if others:
        shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
        raise StoreError(f"uncommitted changes other than train.py ({shown}): commit or stash them first")


def commit_train_py(message: str, cwd=".") -> str:
    """Commit train.py alone (whatever else is staged stays staged); returns the new short sha."""
    git("add", TRAIN_PY, cwd=cwd)
    git("commit", "--quiet", "-m", message, "--", TRAIN_PY, cwd=cwd)
    return head(cwd)
