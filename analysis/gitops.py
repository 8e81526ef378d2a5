"""
The git operations of the bookkeeping commands. History is only ever added to (a revert is a new
commit); nothing here resets, checks out over, or deletes anything but a stale index.lock that no
running git holds.
"""

import ast
import os
import subprocess
from pathlib import Path

from analysis.store import TRAIN_PY, StoreError

INDEX_LOCK = "index.lock"
# Operations that leave the repository half-way (the file or folder git keeps while one is in progress),
# with what finishes and what abandons each: a commit in their middle would be part of them.
IN_PROGRESS = (("MERGE_HEAD", "a merge", "git merge --continue", "git merge --abort"),
               ("rebase-merge", "a rebase", "git rebase --continue", "git rebase --abort"),
               ("rebase-apply", "a rebase (or git am)", "git rebase --continue", "git rebase --abort"),
               ("CHERRY_PICK_HEAD", "a cherry-pick", "git cherry-pick --continue", "git cherry-pick --abort"),
               ("REVERT_HEAD", "a revert", "git revert --continue", "git revert --abort"))
HARNESS_MODULES = ("prepare", "schema")  # imported by every train.py, and checked by the integrity rules instead


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


def git_path(name: str, cwd=".") -> Path:
    """The path of `name` inside the repository's git directory (.git/<name>; a worktree's own for a worktree)."""
    return Path(cwd) / git("rev-parse", "--git-path", name, cwd=cwd).strip()


def git_processes(repo_root) -> list:
    """pids of the running git processes whose working directory is inside `repo_root` (from /proc;
    processes this user may not inspect are not seen)."""
    root = Path(repo_root).resolve()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0]
            if comm != "git" and Path(os.fsdecode(argv0)).name != "git":
                continue
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:  # gone meanwhile, or not ours to inspect
            continue
        if cwd == root or root in cwd.parents:
            pids.append(int(entry.name))
    return pids


def toplevel(cwd=".") -> Path:
    return Path(git("rev-parse", "--show-toplevel", cwd=cwd).strip())


def clear_stale_index_lock(cwd="."):
    """Remove an index.lock that no running git holds (a git killed mid-commit leaves it, and every later
    git command that writes the index refuses); returns a note, or None when there was nothing to do.
    A lock held by a live git is left alone (refuse_unsafe_state reports it)."""
    if not is_repo(cwd):
        return None
    lock = git_path(INDEX_LOCK, cwd)
    try:
        before = lock.stat()
    except FileNotFoundError:
        return None
    if git_processes(toplevel(cwd)):
        return None
    try:
        after = lock.stat()
    except FileNotFoundError:
        return None
    if (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns):
        return None  # a git started meanwhile and took the lock afresh
    lock.unlink(missing_ok=True)
    return f"removed the stale {lock}: left by a git that was killed (no git is running in this repository)"


def refuse_unsafe_state(cwd="."):
    """Refuse, before anything is changed, where a commit would fail or land where it should not: the
    index locked by a running git, a merge / rebase / cherry-pick / revert in progress, a detached HEAD."""
    lock = git_path(INDEX_LOCK, cwd)
    if lock.exists():
        pids = git_processes(toplevel(cwd))
        raise StoreError(f"{lock} is held by a running git (pid {', '.join(map(str, pids)) or '?'}): wait for it "
                         f"to finish, then run the command again")
    for name, what, finish, abort in IN_PROGRESS:
        path = git_path(name, cwd)
        if path.exists():
            raise StoreError(f"{what} is in progress ({path}): finish it (`{finish}`) or abandon it (`{abort}`), "
                             f"then run the command again")
    if subprocess.run(["git", "symbolic-ref", "-q", "HEAD"], cwd=cwd, capture_output=True).returncode != 0:
        branches = git("for-each-ref", "--points-at", "HEAD", "--format=%(refname:short)", "refs/heads/",
                       cwd=cwd).splitlines()
        branch = branches[0] if len(branches) == 1 else "<branch>"
        raise StoreError(f"HEAD is detached (at {head(cwd)}): a commit here would be on no branch; "
                         f"`git switch {branch}` first, then run the command again")


def local_imports(code: str, folder=".") -> list:
    """The local files a train.py imports: the top-level names of its imports that are a `<name>.py` or a
    `<name>/` beside it (the harness modules excepted), as paths relative to `folder`."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return [candidate for name in sorted(names - set(HARNESS_MODULES)) for candidate in (f"{name}.py", name)
            if (Path(folder) / candidate).exists()]


def uncommitted_import(code: str, commit: str, cwd="."):
    """(path, why) of a local module `code` imports that keeps its run at `commit` from being reproduced
    from that commit (untracked, or absent from the commit); None when all are committed. Changes to a
    tracked one are refuse_unsafe_tree's."""
    for path in local_imports(code, cwd):
        untracked = git("ls-files", "--others", "--exclude-standard", "--", path, cwd=cwd).split("\n")[:-1]
        if untracked:
            return path, "is untracked" if untracked == [path] else f"holds untracked files ({', '.join(untracked[:3])})"
        if subprocess.run(["git", "cat-file", "-e", f"{commit}:{path}"], cwd=cwd, capture_output=True).returncode:
            return path, f"is not in the run's commit {commit}"
    return None
