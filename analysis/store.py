"""
The experiment store, .auto-log-research/: the ledger, results.tsv, the archive folders, the lock.

    results.tsv   one row per run: commit val_bpb memory_gb status description, then extra columns
    runs.jsonl    one object per run: the whole run_summary.json plus the ledger and verdict fields
    <run_id>/     run_summary.json metrics.jsonl run.log train.py diff.patch analysis.md *.png

runs.jsonl is the ledger of record (strict JSON) and results.tsv is written from it, both through
this module only: read-modify-write under an exclusive lock, each file replaced atomically, so two
analyze.py processes at once or one killed half-way never lose or corrupt a row; what a killed one
leaves (temporary files, an archive folder without a row, a results.tsv behind runs.jsonl, a head
record left pending) the next one repairs (Store.repair).

The ledger is hash-chained (Store.read_ledger, Store.write_ledger; LEDGER_CHAIN says what that
guarantees), and every row is checked by the one row validator (row_problem) as it is read: every
reader goes through read_ledger, and a broken ledger is one LedgerError naming its first broken
row, never a traceback.
"""

import csv
import errno
import hashlib
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
from harness.contract import RUN_METRICS, STATUSES, TRAIN_PY, HarnessError, atomic_write, stamp
from analysis.runfiles import KIND_CHECKS, SUMMARY_FIELD_KINDS, read_metrics, replace_non_finite

STORE_DIR = ".auto-log-research"
RESULTS_TSV = "results.tsv"
RUNS_JSONL = "runs.jsonl"
# The agents' own files, the one folder of the store an agent's box may change (night/sandbox.py):
# everything else is written by analyze.py, which a boxed night runs outside the box
NOTES_DIR = "notes"
INSIGHTS = f"{NOTES_DIR}/insights.md"
IDEAS = f"{NOTES_DIR}/ideas_queue.md"  # prioritised hypotheses (`analyze.py claims` lists them)
# where a store from before notes/ kept them (Store.notes_folder moves them in)
LEGACY_NOTES = {INSIGHTS: "insights.md", IDEAS: "ideas_queue.md"}
PROGRESS_PNG = "progress.png"
REPORT_HTML = "report.html"  # the morning report (analysis/html_report.py)
LOCK_FILE = ".lock"
LOCK_ANCHOR = ".anchor/lock"  # the lock file's second name: removing .lock cannot free the lock
COMPARE_DIR = "compare"       # overlay plots of `analyze.py compare A B`
CONFIRMATION_FILE = "confirmation.json"  # the last night's confirmation (night/confirm.py)
NIGHT_FILE = "night.json"     # the night running on this store: its supervisor and the keep policy
                              # it fixed at its start (written and removed by supervise.py)
SANDBOX_LOG = "sandbox.log"   # one line per night's start: its agent boxed, or UNBOXED and why
UNBOXED = "UNBOXED"           # (night/sandbox.py; the morning report shows the latest when unboxed)

TSV_COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description")  # fixed, in this order
TSV_EXTRA_COLUMNS = ("run_id", "verdict", "seed", "delta_best", "delta_sigma", "p_value",
                     "num_steps", "mfu_percent", "device", "started_at", "worker")
LOCK_TIMEOUT_S = 300          # a concurrent analyze takes seconds; minutes of waiting: a stuck one
LOCK_POLL_S = 0.05            # between non-blocking tries of a held lock (so that it can time out)
HEAD_FILE = "runs.head.json"  # the ledger's head record (see LEDGER_CHAIN)
CHAIN_FIELD = "prev_sha256"   # every ledger row's: the sha256 of the previous row's line
CHAIN_START = "0" * 64        # the first row's prev_sha256, and the last sha256 of no rows
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")  # atomic_write's: .<name>.<pid>.tmp


LEDGER_CHAIN = f"""
What the chain guarantees. Each runs.jsonl row carries {CHAIN_FIELD}: the sha256 of the previous
row's line as written (its bytes before the newline; {CHAIN_START[:8]}... for the first row), and
{HEAD_FILE} holds the ledger's head, {{"rows": the row count, "last_sha256": the sha256 of the
last line}}. Both are written under the store's lock: first the new head as "pending" beside the
old one, then runs.jsonl, then the new head alone, so that a reader at any moment, or after a kill
at any point, finds runs.jsonl matching the head or its pending one (Store.repair settles a
pending head). A row edited, removed, added, moved or stripped of its {CHAIN_FIELD}, or the last
rows removed, no longer chains, and every read names the first broken row. This is tamper
*evidence* against naive edits (a text editor, sed, an agent rewriting a line), not protection:
whoever can write the store can recompute the chain. A ledger written before the chain (no row has
{CHAIN_FIELD} and there is no {HEAD_FILE}) is read as it is and chained on its next write.
"""
# the end of a LedgerError: what to do about a broken chain, and about a row no reader can use
LEDGER_RECOVERY = (f"nothing is judged against this ledger until it is repaired: undo that edit "
                   f"({RESULTS_TSV} holds each row as analyze.py last wrote it), or, if the "
                   f"ledger as it is now is right, accept it with `uv run analyze.py reseal`")
ROW_RECOVERY = (f"nothing is judged against this ledger until it is repaired: fix that line "
                f"({RESULTS_TSV} holds each row as analyze.py last wrote it), then accept the "
                f"ledger with `uv run analyze.py reseal`")


class LedgerError(HarnessError):
    """runs.jsonl is not as this module wrote it: `why` names its first broken row, `line`
    (1-based, or None) and `run_id` (or None) are that row's; the message is one line: why, then
    what to do."""

    def __init__(self, why: str, line=None, run_id=None, recovery: str = LEDGER_RECOVERY):
        super().__init__(f"{why}; {recovery}")
        self.why, self.line, self.run_id = why, line, run_id


# Ledger fields beyond run_summary.json's (analysis/runfiles.py SUMMARY_FIELD_KINDS, whose kinds a
# row's copies keep) that the readers format or compute with, and the kind each must be; null is
# always allowed. run_id and status are required.
LEDGER_FIELD_KINDS = {
    **dict.fromkeys(("description", "verdict", "verdict_reason", "verdict_mode", "worker",
                     "night", "agent", "analyzed_at", "train_status", "best_run_id",
                     "run_log_sha256", "summary_sha256", "metrics_sha256", CHAIN_FIELD),
                    "a string"),
    **dict.fromkeys(("delta_best", "delta_sigma", "p_value", "n_pooled", "noise_sigma",
                     "noise_df", "run_log_mtime_ns", "metrics_mtime_ns"), "a number"),
    **dict.fromkeys(("notes", "integrity"), "a list"),
}
ROW_FIELD_KINDS = {**{k: v for k, v in SUMMARY_FIELD_KINDS.items() if k != "status"},
                   **LEDGER_FIELD_KINDS}
ROW_KIND_CHECKS = {**KIND_CHECKS, "a list": lambda v: isinstance(v, list)}


def row_problem(row) -> str:
    """The one row validator behind every reader of the ledger (through read_ledger): why a parsed
    runs.jsonl line is not a row the readers can use, or None. A row is an object with a non-empty
    string run_id, a status of contract.STATUSES, and every known field of the kind the readers
    need, or null."""
    if not isinstance(row, dict):
        return f"is {type(row).__name__} {json.dumps(row)[:60]}, not an object"
    if not isinstance(row.get("run_id"), str) or not row["run_id"]:
        return f"has run_id {json.dumps(row.get('run_id'))[:60]}, not a run id"
    if row.get("status") not in STATUSES:
        return (f"has status {json.dumps(row.get('status'))[:60]}, not one of "
                f"{', '.join(STATUSES)}")
    for key, kind in ROW_FIELD_KINDS.items():
        value = row.get(key)
        if value is not None and not ROW_KIND_CHECKS[kind](value):
            return f"has {key} {json.dumps(value)[:60]}, not {kind}"
    return None


def line_sha256(line: bytes) -> str:
    """The sha256 that a row's successor (or the head) records of its line (without newline)."""
    return hashlib.sha256(line).hexdigest()


def ledger_state(lines: list) -> dict:
    """The head record of runs.jsonl's `lines` (bytes, without newlines)."""
    return {"rows": len(lines), "last_sha256": line_sha256(lines[-1]) if lines else CHAIN_START}


def chained_lines(ledger: list) -> list:
    """runs.jsonl's lines (bytes) of `ledger`: strict JSON (a NaN left in an old record becomes
    null), each row with the CHAIN_FIELD of the line before it."""
    lines, prev = [], CHAIN_START
    for record in ledger:
        row = {k: v for k, v in replace_non_finite(record)[0].items() if k != CHAIN_FIELD}
        row[CHAIN_FIELD] = prev
        lines.append(json.dumps(row, sort_keys=True, allow_nan=False).encode())
        prev = line_sha256(lines[-1])
    return lines


def chain_break(rows: list, head) -> tuple:
    """(the 1-based index of the first broken row or None, why) of parsed runs.jsonl `rows`
    [(line bytes, row)] against the head record `head` (None: no head file); (None, None) when
    they chain. Unchained rows pass only as a ledger from before the chain (no head, or a write
    from it cut short)."""
    lines = [line for line, _ in rows]
    states = [head, head.get("pending")] if head else []
    matches_head = ledger_state(lines) in [{k: s.get(k) for k in ("rows", "last_sha256")}
                                           for s in states if isinstance(s, dict)]
    if not any(CHAIN_FIELD in row for _, row in rows) and (head is None or matches_head):
        return None, None
    prev = CHAIN_START
    for i, (line, row) in enumerate(rows, start=1):
        link = row.get(CHAIN_FIELD)
        if link is None:
            return i, f"has no {CHAIN_FIELD} (removed by hand)"
        if link != prev:
            if i == 1:
                return 1, ("does not start the chain: rows before it were removed, or it was "
                           "moved")
            return i - 1, (f"is not as analyze.py wrote it: the next row's {CHAIN_FIELD} is not "
                           f"its sha256 (it was changed, or a row after it removed or moved)")
        prev = line_sha256(line)
    if head is None:
        return len(rows), f"has no head record: {HEAD_FILE} was removed"
    if matches_head:
        return None, None
    if not rows:
        return None, f"has no rows, but {HEAD_FILE} records {head.get('rows')}: they were removed"
    recorded = head.get("rows")
    if isinstance(recorded, int) and 0 < recorded < len(rows) \
            and line_sha256(lines[recorded - 1]) == head.get("last_sha256"):
        return recorded + 1, f"was added by hand: {HEAD_FILE} records {recorded} rows"
    return len(rows), (f"is not the last row analyze.py wrote ({HEAD_FILE} records "
                                 f"{recorded} rows): it was changed, or rows after it removed")

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

    def run_notes(self, run_id: str) -> Path:
        """The agent's investigation notes on run `run_id` (its analysis.md is the harness's)."""
        return self.dir / NOTES_DIR / f"{run_id}.md"

    def note(self, name: str) -> Path:
        """Where to read the note `name` (INSIGHTS, IDEAS): in notes/, or where a store from
        before notes/ that no command has written since still keeps it."""
        path, legacy = self.path(name), self.path(LEGACY_NOTES[name])
        return legacy if not path.exists() and legacy.exists() else path

    def notes_folder(self) -> Path:
        """The notes folder, made where missing; a store from before it has its insights.md and
        ideas_queue.md moved in."""
        folder = self.dir / NOTES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        for new, old in LEGACY_NOTES.items():
            if self.path(old).is_file() and not self.path(new).exists():
                self.path(old).rename(self.path(new))
        return folder

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
    def read_head(self):
        """The ledger's head record (LEDGER_CHAIN), or None when there is none."""
        path = self.path(HEAD_FILE)
        try:
            head = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise LedgerError(f"{path} is corrupt ({e}): it is only ever replaced atomically, so "
                              f"it was edited by hand") from None
        if not isinstance(head, dict):
            raise LedgerError(f"{path} is not an object: it was edited by hand")
        return head

    def ledger_rows(self) -> list:
        """[(line bytes, row)] of runs.jsonl, each row checked by row_problem (blank lines, which
        the writer never writes, are skipped); a LedgerError names the first that fails."""
        path = self.path(RUNS_JSONL)
        data = path.read_bytes() if path.exists() else b""
        rows = []
        for i, line in enumerate(data.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:  # a JSONDecodeError, or bytes that are not UTF-8
                raise LedgerError(f"{path} line {i} is corrupt ({getattr(e, 'msg', e)}): it is "
                                  f"only ever replaced atomically, so it was edited by hand", i,
                                  recovery=ROW_RECOVERY) from None
            problem = row_problem(row)
            if problem:
                run = row.get("run_id") if isinstance(row, dict) else None
                raise LedgerError(f"{path} line {i}{f' (run {run})' if run else ''} {problem}: "
                                  f"it was edited by hand", i, run, recovery=ROW_RECOVERY)
            rows.append((line, row))
        return rows

    def read_ledger(self) -> list:
        """The ledger, every row checked (row_problem) and the chain verified against the head
        (LEDGER_CHAIN): the single entry of every reader. A row that fails either is a
        LedgerError naming the first broken row (its line and run) and what to do."""
        rows = self.ledger_rows()
        line, why = chain_break(rows, self.read_head())
        if why:
            run = rows[line - 1][1]["run_id"] if line else None
            where = f" line {line} (run {run})" if line else ""
            raise LedgerError(f"{self.path(RUNS_JSONL)}{where} {why}", line, run)
        return [{k: v for k, v in row.items() if k != CHAIN_FIELD} for _, row in rows]

    def write_ledger(self, ledger: list, reseals=None):
        """Replace runs.jsonl, chained (chained_lines), with its head record (LEDGER_CHAIN), then
        results.tsv written from it (call under lock()). The head keeps the notes of every
        `reseal` (`reseals`: the list to keep instead, reseal's own)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path, head_path = self.path(RUNS_JSONL), self.path(HEAD_FILE)
        lines = chained_lines(ledger)
        current = path.read_bytes().split(b"\n") if path.exists() else []
        reseals = self.reseals() if reseals is None else reseals
        new = {**ledger_state(lines), "resealed": reseals}
        before = {**ledger_state([line for line in current if line.strip()]), "resealed": reseals}
        atomic_write(head_path, json.dumps({**before, "pending": new}, sort_keys=True) + "\n")
        atomic_write(path, b"".join(line + b"\n" for line in lines), mode="wb")
        atomic_write(head_path, json.dumps(new, sort_keys=True) + "\n")
        atomic_write(self.path(RESULTS_TSV), tsv_text(ledger))

    def settle_head(self) -> list:
        """Settle the head a write cut short between its steps left pending (call under lock()):
        the head of the runs.jsonl that is there. One note, or none."""
        head = self.read_head()
        if not head or not isinstance(head.get("pending"), dict):
            return []
        rows = self.ledger_rows()
        state = ledger_state([line for line, _ in rows])
        pending = head["pending"]
        settled = pending if {k: pending.get(k) for k in state} == state else \
            {k: v for k, v in head.items() if k != "pending"}
        atomic_write(self.path(HEAD_FILE), json.dumps(settled, sort_keys=True) + "\n")
        return [f"settled {HEAD_FILE} of a ledger write that was cut short"]

    def reseal(self) -> tuple:
        """Accept runs.jsonl as it is now (`analyze.py reseal`, call under lock()): every row must
        still pass row_problem; the chain is written afresh and the head keeps a note of what was
        broken, which `status` shows from then on. (the ledger, what was broken or None)."""
        try:
            self.read_ledger()
            return None, None
        except LedgerError as e:
            broken = e.why
        rows = [row for _, row in self.ledger_rows()]
        try:
            reseals = self.reseals()
        except LedgerError:  # the head itself was edited: its earlier notes are lost with it
            reseals = []
        self.write_ledger(rows, reseals + [{"at": stamp(), "broken": broken}])
        return rows, broken

    def reseals(self) -> list:
        """The notes of every `reseal` of this ledger, oldest first."""
        return (self.read_head() or {}).get("resealed") or []

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
                      if p.is_dir() and p.name not in known
                      and p.name not in (COMPARE_DIR, NOTES_DIR)
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
        - a head record a write left pending is settled (settle_head);
        - archive folders with no ledger row (an analyze killed before it recorded its run; the
          run's files are still where train.py left them) are removed, so analyzing the run again
          archives it once;
        - results.tsv is rewritten from runs.jsonl where it differs (a kill between the two
          writes)."""
        notes = []
        if not self.dir.exists():
            return notes
        self.notes_folder()
        stale = self.stale_temp_files()
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            notes.append(f"removed {len(stale)} temporary file(s) left by killed processes: "
                         + ", ".join(str(p.relative_to(self.root)) for p in stale[:3])
                         + (" ..." if len(stale) > 3 else ""))
        notes += self.settle_head()
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
