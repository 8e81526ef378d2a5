"""
The experiment store (.auto-log-research/) and the files a training run leaves behind.

    results.tsv   one row per run: commit val_bpb memory_gb status description, then extra columns
    runs.jsonl    one object per run: the whole run_summary.json plus the ledger and verdict fields
    <run_id>/     run_summary.json metrics.jsonl run.log train.py diff.patch analysis.md *.png

runs.jsonl is the ledger of record and results.tsv is written from it, both through this module
only: read-modify-write under an exclusive lock, each file replaced atomically, so two analyze.py
processes at once or one killed half-way never lose or corrupt a row.
"""

import csv
import fcntl
import hashlib
import io
import json
import math
import os
import re
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import schema

STORE_DIR = ".auto-log-research"
RESULTS_TSV = "results.tsv"
RUNS_JSONL = "runs.jsonl"
INSIGHTS = "insights.md"
PROGRESS_PNG = "progress.png"
LOCK_FILE = ".lock"
COMPARE_DIR = "compare"       # overlay plots of `analyze.py compare A B`
RUN_FILES = ("run_summary.json", "metrics.jsonl", "run.log")  # what train.py leaves in the working directory

TSV_COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description")  # fixed, in this order
TSV_EXTRA_COLUMNS = ("run_id", "verdict", "seed", "delta_best", "delta_sigma", "p_value", "num_steps",
                     "mfu_percent", "device", "started_at")
LOCK_TIMEOUT_S = 300          # a concurrent analyze takes seconds; minutes of waiting means a stuck process
STAMP_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # started_at (RunLogger) and analyzed_at
TRACEBACK_LINES = 30          # lines of a crashed run's log shown in analysis.md


class StoreError(Exception):
    """A refusal or a broken store: analyze.py prints it as one `error:` line and exits non-zero."""


def parse_stamp(stamp):
    """Epoch seconds of a "%Y-%m-%dT%H:%M:%S%z" timestamp (started_at, analyzed_at), or None."""
    try:
        return datetime.strptime(stamp, STAMP_FORMAT).timestamp()
    except (TypeError, ValueError):
        return None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: Path, data, mode: str = "w"):
    """Write to a temporary file beside `path`, fsync, then rename over it: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# The files of one run
# ---------------------------------------------------------------------------

def read_metrics(path: Path):
    """(records, problems) of a metrics.jsonl. A crashed run may end in a half-written line: the
    complete lines are kept and the truncation reported, never raised."""
    path = Path(path)
    if not path.exists():
        return [], [f"{path.name} is missing"]
    records, problems = [], []
    lines = path.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            last = i == len(lines) - 1
            problems.append(f"line {i + 1} of {path.name} is {'truncated' if last else 'not JSON'}")
            continue
        if not isinstance(record, dict):
            problems.append(f"line {i + 1} of {path.name} is not an object")
            continue
        bad = schema.step_record_problems(record)
        if bad:
            problems.append(f"step {record.get(schema.STEP)}: {bad[0]}")
            if any(k not in record for k in schema.REQUIRED_STEP_KEYS):
                continue
        records.append(record)
    return records, problems


def _last_traceback(lines: list):
    """(start, end) of the last Python traceback in log lines, end just past its exception line
    (output printed after it, such as exit-time warnings, is not part of it); None without one."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if not starts:
        return None
    end = next((i + 1 for i in range(starts[-1] + 1, len(lines)) if lines[i] and not lines[i][0].isspace()),
               len(lines))
    return starts[-1], end


def traceback_tail(log_text: str, n: int = TRACEBACK_LINES) -> str:
    """The last traceback in a log (its last `n` lines), else the log's last `n` lines."""
    if not log_text:
        return ""
    lines = log_text.rstrip().splitlines()
    span = _last_traceback(lines)
    return "\n".join((lines[span[0]:span[1]] if span else lines)[-n:])


def failure_line(log_text: str):
    """The exception line of the last traceback in a log, or None."""
    lines = (log_text or "").rstrip().splitlines()
    span = _last_traceback(lines)
    return lines[span[1] - 1] if span else None


def load_run(run_dir) -> dict:
    """The files train.py left in `run_dir`, as found (nothing is checked against the store here)."""
    run_dir = Path(run_dir)
    summary, summary_problem = None, None
    summary_path = run_dir / "run_summary.json"
    if summary_path.exists():
        try:
            summary = json.loads(summary_path.read_text())
            if not isinstance(summary, dict):
                summary, summary_problem = None, "run_summary.json is not an object"
        except json.JSONDecodeError as e:
            summary_problem = f"run_summary.json is corrupt ({e.msg})"
    log_path = run_dir / "run.log"
    log_bytes = log_path.read_bytes() if log_path.exists() else None
    metrics_path = run_dir / "metrics.jsonl"
    metrics_bytes = metrics_path.read_bytes() if metrics_path.exists() else None
    records, metrics_problems = read_metrics(metrics_path)
    return {
        "dir": run_dir, "summary": summary, "summary_problem": summary_problem,
        "records": records, "metrics_problems": metrics_problems,
        "log": log_bytes.decode(errors="replace") if log_bytes is not None else None,
        "log_mtime": log_path.stat().st_mtime if log_bytes is not None else None,
        "run_log_sha256": sha256_bytes(log_bytes) if log_bytes is not None else None,
        "metrics_sha256": sha256_bytes(metrics_bytes) if metrics_bytes is not None else None,
    }


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
        """Exclusive lock on the store (advisory, released by the OS if the process dies)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.path(LOCK_FILE), "a") as f:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StoreError(f"another analyze.py has held {self.path(LOCK_FILE)} for "
                                         f"{timeout:.0f} s; is one stuck? (ps aux | grep analyze.py)") from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

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
                    raise StoreError(f"{path} line {i + 1} is corrupt ({e.msg}); it is only ever replaced "
                                     f"atomically, so it was edited by hand: fix or remove that line") from None
        return ledger

    def write_ledger(self, ledger: list):
        """Replace runs.jsonl, then results.tsv written from it (call under lock())."""
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path(RUNS_JSONL), "".join(json.dumps(r, sort_keys=True) + "\n" for r in ledger))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=TSV_COLUMNS + TSV_EXTRA_COLUMNS, delimiter="\t",
                                lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        writer.writeheader()
        writer.writerows(tsv_row(r) for r in ledger)
        atomic_write(self.path(RESULTS_TSV), buf.getvalue())

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
        raise StoreError(f"unknown run id {run_id!r} (latest: {known}); see `uv run analyze.py status`")

    # archives
    def allocate_run_id(self, commit) -> str:
        """A fresh archive folder: the short commit, then -2, -3, ... for repeats (mkdir is atomic)."""
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
                      if p.is_dir() and p.name not in known and p.name not in (COMPARE_DIR,) and not p.name.startswith("."))

    def archived_records(self, run_id: str):
        records, _ = read_metrics(self.run_path(run_id) / "metrics.jsonl")
        return records
