"""
The fixed files, checked by their content: never through git's view of the working tree.

`git status` trusts the index: `git update-index --assume-unchanged` or `--skip-worktree` hides an
edited file from it, and .gitignore or .git/info/exclude hides a new one. Here every fixed file
(contract.FIXED_PATHSPECS) on disk is listed by walking the folders, hashed as git hashes a blob,
and compared with the blob a commit holds (`git ls-tree`, which reads objects, not the index);
a compiled `__pycache__/*.pyc` that Python would load instead of its source must hold the code of
that source. Also the snapshot the supervisor keeps in memory for a night: the sha256 of every
fixed file and of the virtual environment's startup hooks (.pth files, sitecustomize.py,
usercustomize.py), which run before any code of the harness. Standard library only.
"""

import fnmatch
import hashlib
import importlib.util
import json
import marshal
import os
import sys
from pathlib import Path

from harness import contract, git

PYCACHE = "__pycache__"
# Python runs these from site-packages at every start of the interpreter, before any harness code
# (site.py): a line of a .pth file that starts with `import` is executed.
STARTUP_HOOKS = ("sitecustomize.py", "usercustomize.py")
PTH_SUFFIX = ".pth"
# git's modes of a blob: a file (executable or not) and a symbolic link (its blob is the target)
FILE_MODES, LINK_MODE = ("100644", "100755"), "120000"
# a .pyc header: magic, flags, then (mtime, size) of its source or (flags bit 0) the source's hash
PYC_HEADER_BYTES = 16
PYC_HASH_BASED, PYC_CHECK_SOURCE = 0b01, 0b10
# in the store: what a night's supervisor found changed (night/watch.py), one line each, for the
# morning (`analyze.py status` shows it first)
TAMPERING_FILE = "tampering.log"


def on_disk(root) -> list:
    """Every file under the fixed paths in `root`, relative and sorted, found by listing the folders
    (untracked and ignored ones too); __pycache__ folders are bytecode_problems'."""
    root, found = Path(root), []
    for spec in contract.FIXED_PATHSPECS:
        top = root / spec
        if top.is_symlink() or top.is_file():
            found.append(spec)
            continue
        for folder, dirs, files in os.walk(top):
            links = [d for d in dirs if (Path(folder) / d).is_symlink()]
            dirs[:] = sorted(d for d in dirs if d != PYCACHE and d not in links)
            found += [(Path(folder) / name).relative_to(root).as_posix() for name in files + links]
    return sorted(found)


def blob_id(path, algorithm: str = "sha1") -> str:
    """The id git gives `path`'s content as a blob (a symbolic link: its target), with no filter."""
    path = Path(path)
    data = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
    return hashlib.new(algorithm, b"blob %d\0" % len(data) + data).hexdigest()


def committed(root, commit: str) -> dict:
    """{path: blob id} of the fixed files in `commit`, read from git's objects (not the index)."""
    out = git.git("ls-tree", "-r", "-z", "--full-tree", commit, "--", *contract.FIXED_PATHSPECS,
                  cwd=root)
    blobs = {}
    for entry in filter(None, out.split("\0")):
        meta, path = entry.split("\t", 1)
        mode, _, sha = meta.split()
        if mode in FILE_MODES or mode == LINK_MODE:
            blobs[path] = sha
    return blobs


def differences(root, commit: str) -> list:
    """(path, what) of each fixed file whose content in `root` is not the blob in `commit`: what is
    "changed", "new" (not in the commit, however git ignores it) or "missing"."""
    blobs = committed(root, commit)
    algorithm = git.git("rev-parse", "--show-object-format", cwd=root).strip() or "sha1"
    found = []
    for path in on_disk(root):
        if path not in blobs:
            found.append((path, "new"))
        elif blob_id(Path(root) / path, algorithm) != blobs[path]:
            found.append((path, "changed"))
    found += [(path, "missing") for path in blobs
              if not (Path(root) / path).exists() and not (Path(root) / path).is_symlink()]
    return sorted(found)


def _loaded_instead(pyc: Path, source: Path) -> bool:
    """Whether this interpreter's import would run `pyc` rather than compile `source` (its
    checks: the magic number, then the source's mtime and size, or its hash)."""
    header = pyc.read_bytes()[:PYC_HEADER_BYTES]
    if len(header) < PYC_HEADER_BYTES or header[:4] != importlib.util.MAGIC_NUMBER:
        return False
    flags = int.from_bytes(header[4:8], "little")
    if flags & PYC_HASH_BASED:
        return (not flags & PYC_CHECK_SOURCE
                or header[8:16] == importlib.util.source_hash(source.read_bytes()))
    stat = source.stat()
    return (int.from_bytes(header[8:12], "little") == int(stat.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(header[12:16], "little") == stat.st_size & 0xFFFFFFFF)


def bytecode_problems(root) -> list:
    """(path, what) of each __pycache__/*.pyc under the fixed folders that this interpreter would
    load in place of its source but that holds other code: an edit hidden from every diff."""
    found = []
    tag = sys.implementation.cache_tag
    for spec in contract.FIXED_PATHSPECS:
        for pyc in sorted((Path(root) / spec).rglob(f"{PYCACHE}/*.{tag}*.pyc")):
            stem, _, rest = pyc.name.partition(f".{tag}")
            source = pyc.parent.parent / f"{stem}.py"
            level = rest[len(".opt-"):-len(".pyc")] if rest.startswith(".opt-") else "0"
            if not source.is_file() or not level.isdigit() or not _loaded_instead(pyc, source):
                continue  # not what an import here would run
            try:
                code = marshal.loads(pyc.read_bytes()[PYC_HEADER_BYTES:])
            except (EOFError, ValueError, TypeError):
                code = None  # unreadable: import would fail on it, which is no honest state either
            if code != compile(source.read_bytes(), str(source), "exec", dont_inherit=True,
                               optimize=int(level)):
                found.append((pyc.relative_to(root).as_posix(), "bytecode"))
    return found


def startup_hooks(site_dirs) -> list:
    """The files in `site_dirs` (site-packages folders) that Python runs at its start."""
    hooks = []
    for folder in map(Path, site_dirs):
        if folder.is_dir():
            hooks += sorted(p for p in folder.iterdir()
                            if p.suffix == PTH_SUFFIX or p.name in STARTUP_HOOKS)
    return hooks


def snapshot(root, site_dirs) -> dict:
    """{path: sha256} of every fixed file in `root` (relative path) and every startup hook in
    `site_dirs` (absolute path): what a night compares against after each change."""
    files = {path: contract.sha256_file(Path(root) / path) for path in on_disk(root)
             if (Path(root) / path).is_file()}
    files.update({str(p): contract.sha256_file(p) for p in startup_hooks(site_dirs)})
    return files


def snapshot_changes(before: dict, after: dict) -> list:
    """(path, what) of each file whose hash differs between two snapshots."""
    return sorted([(p, "changed") for p in before if p in after and before[p] != after[p]]
                  + [(p, "missing") for p in before if p not in after]
                  + [(p, "new") for p in after if p not in before])


# The files that judge a run, find the store's first run and check integrity (patterns): a change
# to one could silence every other check (a `finished` that never finds the first run drops the
# comparison with its commit), so analyze.py compares them first, by content, with that commit.
CHECKER_FILES = ("analyze.py", "analysis/*.py", "harness/contract.py", "harness/fixed.py",
                 "harness/git.py", "harness/settings.py")


# The ledger and what a finished run is (analysis/store.py's STORE_DIR/RUNS_JSONL and
# analysis/verdict.py's NOT_COUNTED), restated: the first run is found here without analysis/,
# whose edit (a `finished` that is never true) would otherwise drop the comparison; a test holds
# them equal.
LEDGER_FILE = ".auto-log-research/runs.jsonl"
NOT_FINISHED = ("crash", "nan", "timeout", "invalid")


def first_run_commit(root):
    """The commit of the ledger's first finished run (any status but NOT_FINISHED, and a finite
    val_bpb), read with json alone; None without one."""
    path = Path(root) / LEDGER_FILE
    if not path.exists():
        return None
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise contract.HarnessError(f"{path} line {i + 1} is corrupt ({e.msg}); it is only "
                                        f"ever replaced atomically, so it was edited by hand: fix "
                                        f"or remove that line") from None
        if (isinstance(row, dict) and row.get("status") not in NOT_FINISHED
                and contract.finite_number(row.get("val_bpb"))):
            return row.get("commit")
    return None


def checker_problems(root, commit: str) -> list:
    """One line per checker file whose content in `root` is not the blob in `commit` (the store's
    first finished run's): the integrity check cannot vouch for a run once it was changed itself."""
    blobs = committed(root, commit)
    algorithm = git.git("rev-parse", "--show-object-format", cwd=root).strip() or "sha1"
    problems = []
    for path in sorted(p for p in blobs if any(fnmatch.fnmatchcase(p, c) for c in CHECKER_FILES)):
        file = Path(root) / path
        if not file.is_file() or blob_id(file, algorithm) != blobs[path]:
            problems.append(f"{path} differs from commit {commit} of the store's first run: the "
                            f"integrity check itself is off limits; restore it with `git checkout "
                            f"{commit} -- {path}` and commit, then run the command again")
    return problems
