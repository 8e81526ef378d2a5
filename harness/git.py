"""
Git, as the harness, the bookkeeping commands and the night use it: one wrapper. History is only
ever added to (a revert is a new commit); nothing here resets, checks out over, or deletes anything
but a stale index.lock that no running git holds.
"""

import ast
import subprocess
from pathlib import Path

from harness import proc
from harness.contract import HARNESS_MODULES, TRAIN_PY, HarnessError

INDEX_LOCK = "index.lock"
# Operations that leave the repository half-way (the file or folder git keeps while one is in
# progress), with what finishes and what abandons each: a commit in their middle would be part of
# them.
IN_PROGRESS = (("MERGE_HEAD", "a merge", "git merge --continue", "git merge --abort"),
               ("rebase-merge", "a rebase", "git rebase --continue", "git rebase --abort"),
               ("rebase-apply", "a rebase (or git am)", "git rebase --continue",
                "git rebase --abort"),
               ("CHERRY_PICK_HEAD", "a cherry-pick", "git cherry-pick --continue",
                "git cherry-pick --abort"),
               ("REVERT_HEAD", "a revert", "git revert --continue", "git revert --abort"))


def run(*args, cwd=".") -> subprocess.CompletedProcess:
    """`git ARGS` in `cwd`, its output captured as text; HarnessError where git is not installed."""
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise HarnessError("git is not installed; the bookkeeping commands need it") from None


def git(*args, cwd=".") -> str:
    """The output of `git ARGS`; HarnessError with git's own last line where it fails."""
    done = run(*args, cwd=cwd)
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise HarnessError(f"git {' '.join(args)} failed: "
                           f"{message[-1] if message else done.returncode}")
    return done.stdout


def succeeds(*args, cwd=".") -> bool:
    return run(*args, cwd=cwd).returncode == 0


def is_repo(cwd=".") -> bool:
    try:
        return succeeds("rev-parse", "--git-dir", cwd=cwd)
    except HarnessError:
        return False  # no git at all: no repository either


def require_repo(cwd="."):
    if not is_repo(cwd):
        raise HarnessError(f"{Path(cwd).resolve()} is not a git repository; keep and discard work "
                           f"through git")


def _output(*args, cwd="."):
    """The stripped output of a git query, or None where it fails (or there is no repository)."""
    if not is_repo(cwd):
        return None
    done = run(*args, cwd=cwd)
    return done.stdout if done.returncode == 0 else None


def head(cwd=".", short=True):
    out = _output("rev-parse", *(["--short"] if short else []), "HEAD", cwd=cwd)
    return out.strip() if out else None


def state(cwd="."):
    """(short commit, dirty) of the repository at cwd, or (None, None) outside one."""
    status = _output("status", "--porcelain", "--untracked-files=no", cwd=cwd)
    commit = head(cwd)
    return (commit, bool(status.strip())) if commit and status is not None else (None, None)


def show(commit: str, path: str = TRAIN_PY, cwd="."):
    """The text of `path` at `commit`, or None where it does not exist there."""
    return _output("show", f"{commit}:{path}", cwd=cwd) if commit else None


def subject(commit: str, cwd="."):
    """The first line of a commit's message, or None."""
    out = _output("log", "-1", "--format=%s", commit, cwd=cwd) if commit else None
    return (out.strip() or None) if out else None


def changed_paths(cwd=".") -> list:
    """Tracked files with uncommitted changes, staged or not (untracked files do not count)."""
    out = git("status", "--porcelain", "--untracked-files=no", cwd=cwd)
    return [line[3:].split(" -> ")[-1] for line in out.splitlines() if line.strip()]


def refuse_unsafe_tree(cwd="."):
    """The bookkeeping commands act on train.py only: refuse while anything else is uncommitted."""
    others = [p for p in changed_paths(cwd) if p != TRAIN_PY]
    if others:
        shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
        raise HarnessError(f"uncommitted changes other than train.py ({shown}): commit or stash "
                           f"them first")


def commit_train_py(message: str, cwd=".") -> str:
    """Commit train.py alone (whatever else is staged stays staged); returns the new short sha."""
    git("add", TRAIN_PY, cwd=cwd)
    git("commit", "--quiet", "-m", message, "--", TRAIN_PY, cwd=cwd)
    return head(cwd)


def git_path(name: str, cwd=".") -> Path:
    """The path of `name` in the repository's git directory (a worktree's own for a worktree)."""
    return Path(cwd) / git("rev-parse", "--git-path", name, cwd=cwd).strip()


def git_processes(repo_root) -> list:
    """pids of the running git processes whose working directory is inside `repo_root` (from
    /proc; processes this user may not inspect are not seen)."""
    root = Path(repo_root).resolve()
    found = []
    for pid in proc.pids():
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue  # gone meanwhile
        if comm != "git" and Path(argv0.decode(errors="replace")).name != "git":
            continue
        cwd = proc.cwd_of(pid)
        if cwd is not None and (cwd == root or root in cwd.parents):
            found.append(pid)
    return found


def toplevel(cwd=".") -> Path:
    return Path(git("rev-parse", "--show-toplevel", cwd=cwd).strip())


def clear_stale_index_lock(cwd="."):
    """Remove an index.lock that no running git holds (a git killed mid-commit leaves it, and every
    later git command that writes the index refuses); a note, or None when there was nothing to do.
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
    return f"removed the stale {lock}: left by a git that was killed (no git is running here)"


def refuse_unsafe_state(cwd="."):
    """Refuse, before anything is changed, where a commit would fail or land where it should not:
    the index locked by a running git, a merge / rebase / cherry-pick / revert in progress, a
    detached HEAD."""
    lock = git_path(INDEX_LOCK, cwd)
    if lock.exists():
        pids = ", ".join(map(str, git_processes(toplevel(cwd)))) or "?"
        raise HarnessError(f"{lock} is held by a running git (pid {pids}): wait for it to finish, "
                           f"then run the command again")
    for name, what, finish, abort in IN_PROGRESS:
        path = git_path(name, cwd)
        if path.exists():
            raise HarnessError(f"{what} is in progress ({path}): finish it (`{finish}`) or abandon "
                               f"it (`{abort}`), then run the command again")
    if not succeeds("symbolic-ref", "-q", "HEAD", cwd=cwd):
        branches = git("for-each-ref", "--points-at", "HEAD", "--format=%(refname:short)",
                       "refs/heads/", cwd=cwd).splitlines()
        branch = branches[0] if len(branches) == 1 else "<branch>"
        raise HarnessError(f"HEAD is detached (at {head(cwd)}): a commit here would be on no "
                           f"branch; `git switch {branch}` first, then run the command again")


def local_imports(code: str, folder=".") -> list:
    """The local files a train.py imports: the top-level names of its imports that are a
    `<name>.py` or a `<name>/` beside it (the harness excepted), relative to `folder`."""
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
    return [candidate for name in sorted(names - set(HARNESS_MODULES))
            for candidate in (f"{name}.py", name) if (Path(folder) / candidate).exists()]


def uncommitted_import(code: str, commit: str, cwd="."):
    """(path, why) of a local module `code` imports that keeps its run at `commit` from being
    reproduced from that commit (untracked, or absent from it); None when all are committed.
    Changes to a tracked one are refuse_unsafe_tree's."""
    for path in local_imports(code, cwd):
        untracked = git("ls-files", "--others", "--exclude-standard", "--", path,
                        cwd=cwd).split("\n")[:-1]
        if untracked:
            return path, ("is untracked" if untracked == [path]
                          else f"holds untracked files ({', '.join(untracked[:3])})")
        if not succeeds("cat-file", "-e", f"{commit}:{path}", cwd=cwd):
            return path, f"is not in the run's commit {commit}"
    return None
