"""
The experiment store, .auto-log-research/: the ledger, results.tsv, the archive folders, the lock.

    results.tsv   one row per run: commit val_bpb memory_gb status description, then extra columns
    runs.jsonl    one object per run: the whole run_summary.json plus the ledger and verdict fields
    <run_id>/     run_summary.json metrics.jsonl run.log train.py diff.patch analysis.md *.png

runs.jsonl is the ledger of record (strict JSON) and results.tsv is written from it, both through
this module only: read-modify-write under an exclusive lock, each file replaced atomically, so two
analyze.py processes at once or one killed half-way never lose or corrupt a row; what a killed one
leaves (temporary files, an archive folder without a row, a results.tsv behind runs.jsonl) the next
one repairs (Store.repair).
"""

import csv
import errno
import fcntl
import io
import json
import math
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from harness import proc, settings
from harness.contract import RUN_METRICS, TRAIN_PY, HarnessError, atomic_write
from analysis.runfiles import read_metrics, replace_non_finite

STORE_DIR = ".auto-log-research"
RESULTS_TSV = "results.tsv"
RUNS_JSONL = "runs.jsonl"
INSIGHTS = "insights.md"
IDEAS = "ideas_queue.md"      # the agents' prioritised hypotheses (`analyze.py claims` lists them)
PROGRESS_PNG = "progress.png"
LOCK_FILE = ".lock"
LOCK_ANCHOR = ".anchor/lock"  # the lock file's second name: removing .lock cannot free the lock
COMPARE_DIR = "compare"       # overlay plots of `analyze.py compare A B`
NIGHT_FILE = "night.json"     # the night running on this store: its supervisor and the keep policy
                              # it fixed at its start (written and removed by supervise.py)

TSV_COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description")  # fixed, in this order
TSV_EXTRA_COLUMNS = ("run_id", "verdict", "seed", "delta_best", "delta_sigma", "p_value",
                     "num_steps", "mfu_percent", "device", "started_at", "worker")
LOCK_TIMEOUT_S = 300          # a concurrent analyze takes seconds; minutes of waiting: a stuck one
LOCK_POLL_S = 0.05            # between non-blocking tries of a held lock (so that it can time out)
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")  # atomic_write's: .<name>.<pid>.tmp


def worker_of(record: dict) -> str:
    """The worker a ledger row is from (rows from before workers were recorded: the only
    agent's)."""
    return record.get("worker") or settings.MAIN_WORKER


# ---------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------

def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e-3 else f"{value:.6f}".rstrip("0").rstrip(".")
    return re.sub(r"[\t\r\n]+", " ", str(value)).strip()


def tsv_row(record: dict) -> dict:
    """One results.tsv row of a ledger record (descriptions lose their tabs and newlines)."""
    vram = record.get("peak_vram_mb")
    row = {"commit": record.get("commit") or "", "val_bpb": record.get("val_bpb"),
           "memory_gb": round(vram / 1024, 1) if isinstance(vram, (int, float)) else None,
           "status": record.get("status"), "description": record.get("description")}
    row.update({k: record.get(k) for k in TSV_EXTRA_COLUMNS})
    return {k: _cell(v) for k, v in row.items()}


def tsv_text(ledger: list) -> str:
    """results.tsv as written from the ledger: a header, then one row per run."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=TSV_COLUMNS + TSV_EXTRA_COLUMNS, delimiter="\t",
                            lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writeheader()
    writer.writerows(tsv_row(r) for r in ledger)
    return buf.getvalue()


class Store:
    def __init__(self, root="."):
        self.root = Path(root)
        self.dir = self.root / STORE_DIR

    # paths
    def path(self, name: str) -> Path:
        return self.dir / name

    def run_path(self, run_id: str) -> Path:
        return self.dir / run_id

    @contextmanager
    def lock(self, timeout: float = LOCK_TIMEOUT_S):
        """Exclusive lock on the store, for every writer of every worker of a night. A POSIX record
        lock (fcntl.lockf: F_SETLK on the whole file) rather than flock: on NFS it is held by the
        server's lock manager (NLM for NFSv3, the protocol itself for v4), so writers on different
        hosts of a shared filesystem exclude each other; the OS releases it when the process dies.
        POSIX locks belong to the process, so one process must not take it twice (analyze.py takes
        it once per command).

        A lock belongs to an inode, not to a name: were .lock removed while a writer holds it, the
        next writer would create a new file and lock that. So the lock file has two names, .lock
        and LOCK_ANCHOR, and a writer never creates one while the other exists: it links the
        missing name back to the same inode (link is atomic, on NFS too). After taking the lock
        it checks that .lock still names the inode it locked (else it was replaced meanwhile:
        release and try again) and restores the anchor. Only removing both names while a writer
        holds the lock hands out a second one."""
        fd = None
        deadline = time.monotonic() + timeout
        while fd is None:
            fd = self._open_lock()
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:  # EACCES or EAGAIN while another process holds it
                os.close(fd)
                fd = None
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                if time.monotonic() > deadline:
                    raise HarnessError(f"another analyze.py has held {self.path(LOCK_FILE)} "
                                       f"for {timeout:.0f} s; is one stuck? "
                                       f"(ps aux | grep analyze.py)") from None
                time.sleep(LOCK_POLL_S)
                continue
            if not self._lock_names_agree(fd):
                os.close(fd)  # closing releases it: the name was replaced between open and lock
                fd = None
        try:
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _open_lock(self) -> int:
        """A descriptor (read-write) on the lock file's inode, by .lock; a missing name is linked
        back from the other, and a new inode with both names is made only where neither exists."""
        lock, anchor = self.path(LOCK_FILE), self.path(LOCK_ANCHOR)
        anchor.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                return os.open(lock, os.O_RDWR)
            except FileNotFoundError:
                pass
            try:
                os.link(anchor, lock)  # .lock was removed: the same inode again
                continue
            except FileExistsError:
                continue  # another writer restored it first
            except FileNotFoundError:
                pass
            fresh = lock.with_name(f"{LOCK_FILE}.{os.getpid()}.tmp")  # a new store's lock file
            os.close(os.open(fresh, os.O_RDWR | os.O_CREAT, 0o644))
            try:
                os.link(fresh, anchor)
            except FileExistsError:
                pass  # another writer made one first: link .lock to its
            finally:
                fresh.unlink()

    def _lock_names_agree(self, fd: int) -> bool:
        """Whether .lock still names the locked inode (called holding the lock); the anchor is
        restored to it where it was removed or replaced."""
        held = os.fstat(fd)
        try:
            named = os.stat(self.path(LOCK_FILE))
        except FileNotFoundError:
            return False
        if (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
            return False
        anchor = self.path(LOCK_ANCHOR)
        try:
            pinned = os.stat(anchor)
        except FileNotFoundError:
            pinned = None
        if pinned is None or (pinned.st_dev, pinned.st_ino) != (held.st_dev, held.st_ino):
            anchor.unlink(missing_ok=True)
            os.link(self.path(LOCK_FILE), anchor)
        return True

    def night(self):
        """The night running on this store ({"pid", "verdict", "started_at"}), or None when none
        is (no file, or its supervisor is gone)."""
        try:
            night = json.loads(self.path(NIGHT_FILE).read_text())
        except (OSError, ValueError):
            return None
        pid = night.get("pid") if isinstance(night, dict) else None
        return night if isinstance(pid, int) and proc.runs_script(pid, "supervise.py") else None

    # ledger
    def read_ledger(self) -> list:
        path = self.path(RUNS_JSONL)
        if not path.exists():
            return []
        ledger = []
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    ledger.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise HarnessError(f"{path} line {i + 1} is corrupt ({e.msg}); it is only "
                                       f"ever replaced atomically, so it was edited by hand: fix "
                                       f"or remove that line") from None
        return ledger

    def write_ledger(self, ledger: list):
        """Replace runs.jsonl (strict JSON: a NaN left in an old record becomes null), then
        results.tsv written from it (call under lock())."""
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path(RUNS_JSONL),
                     "".join(json.dumps(replace_non_finite(r)[0], sort_keys=True, allow_nan=False)
                             + "\n" for r in ledger))
        atomic_write(self.path(RESULTS_TSV), tsv_text(ledger))

    def read_results_tsv(self) -> list:
        path = self.path(RESULTS_TSV)
        if not path.exists():
            return []
        with open(path, newline="") as f:
            return list(csv.DictReader(f, delimiter="\t"))

    def find(self, ledger: list, run_id: str) -> dict:
        for record in ledger:
            if record["run_id"] == run_id:
                return record
        known = ", ".join(r["run_id"] for r in ledger[-5:]) or "none yet"
        raise HarnessError(f"unknown run id {run_id!r} (latest: {known}); see "
                           f"`uv run analyze.py status`")

    # archives
    def allocate_run_id(self, commit) -> str:
        """A fresh archive folder: the short commit, then -2, -3, ... for repeats (mkdir is
        atomic)."""
        base = commit or "nocommit"
        self.dir.mkdir(parents=True, exist_ok=True)
        n = 1
        while True:
            run_id = base if n == 1 else f"{base}-{n}"
            try:
                self.run_path(run_id).mkdir()
                return run_id
            except FileExistsError:
                n += 1

    def orphans(self, ledger: list) -> list:
        """Archive folders with no ledger row: an analyze.py that was interrupted half-way."""
        known = {r["run_id"] for r in ledger}
        if not self.dir.exists():
            return []
        return sorted(p.name for p in self.dir.iterdir()
                      if p.is_dir() and p.name not in known and p.name not in (COMPARE_DIR,)
                      and not p.name.startswith("."))

    def stale_temp_files(self) -> list:
        """atomic_write's temporary files whose process is gone (a kill between write and rename):
        in the store, in its run folders, and train.py's beside it (discard writes train.py
        atomically)."""
        candidates = [*self.dir.glob(".*.tmp"), *self.dir.glob("*/.*.tmp"),
                      *self.root.glob(f".{TRAIN_PY}.*.tmp")]
        stale = []
        for path in sorted(candidates):
            match = TEMP_NAME.match(path.name)
            if match and path.is_file() and not proc.pid_alive(int(match["pid"])):
                stale.append(path)
        return stale

    def repair(self) -> list:
        """Undo what a killed analyze.py left, and say so (call first under lock(): no other
        analyze.py is half-way then, so whatever is half-done is a dead process's). Returns one
        note per repair:
        - temporary files of dead processes are removed;
        - archive folders with no ledger row (an analyze killed before it recorded its run; the
          run's files are still where train.py left them) are removed, so analyzing the run again
          archives it once;
        - results.tsv is rewritten from runs.jsonl where it differs (a kill between the two
          writes)."""
        notes = []
        if not self.dir.exists():
            return notes
        stale = self.stale_temp_files()
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            notes.append(f"removed {len(stale)} temporary file(s) left by killed processes: "
                         + ", ".join(str(p.relative_to(self.root)) for p in stale[:3])
                         + (" ..." if len(stale) > 3 else ""))
        ledger = self.read_ledger()
        orphans = self.orphans(ledger)
        for run_id in orphans:
            shutil.rmtree(self.run_path(run_id))
        if orphans:
            notes.append(f"removed archive folder(s) {', '.join(orphans)} with no ledger row, "
                         f"left by an analyze.py killed before it recorded its run "
                         f"(`uv run analyze.py` archives that run again)")
        tsv = self.path(RESULTS_TSV)
        if ((ledger or tsv.exists())
                and (tsv.read_text() if tsv.exists() else None) != tsv_text(ledger)):
            atomic_write(tsv, tsv_text(ledger))
            notes.append(f"rebuilt {RESULTS_TSV} from {RUNS_JSONL}: it did not match (a write was "
                         f"cut short)")
        return notes

    def recorded(self, run_id: str) -> bool:
        """Whether the ledger has a row for `run_id`."""
        return any(r["run_id"] == run_id for r in self.read_ledger())

    def archived_records(self, run_id: str):
        records, _ = read_metrics(self.run_path(run_id) / RUN_METRICS)
        return records
