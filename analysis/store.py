"""
The experiment store (.auto-log-research/) and the files a training run leaves behind.

    results.tsv   one row per run: commit val_bpb memory_gb status description, then extra columns
    runs.jsonl    one object per run: the whole run_summary.json plus the ledger and verdict fields
    <run_id>/     run_summary.json metrics.jsonl run.log train.py diff.patch analysis.md *.png

runs.jsonl is the ledger of record (strict JSON) and results.tsv is written from it, both through
this module only: read-modify-write under an exclusive lock, each file replaced atomically, so two
analyze.py processes at once or one killed half-way never lose or corrupt a row; what a killed one
leaves (temporary files, an archive folder without a row, a results.tsv behind runs.jsonl) the next
one repairs (Store.repair). What a run left is read defensively: run.log streamed and bounded, bad
metrics lines and summary fields skipped with a note.
"""

import csv
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import re
import shutil
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import schema

STORE_DIR = ".auto-log-research"
RESULTS_TSV = "results.tsv"
RUNS_JSONL = "runs.jsonl"
INSIGHTS = "insights.md"
IDEAS = "ideas_queue.md"      # the agents' prioritised hypotheses (`analyze.py claims` lists their state)
PROGRESS_PNG = "progress.png"
LOCK_FILE = ".lock"
COMPARE_DIR = "compare"       # overlay plots of `analyze.py compare A B`
TRAIN_PY = "train.py"

TSV_COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description")  # fixed, in this order
TSV_EXTRA_COLUMNS = ("run_id", "verdict", "seed", "delta_best", "delta_sigma", "p_value", "num_steps",
                     "mfu_percent", "device", "started_at", "worker")
WORKER_ENV = "AUTORESEARCH_WORKER"          # the worker of a night with several (gpu0, w1, ...), set by supervise.py
WORKER_PID_ENV = "AUTORESEARCH_WORKER_PID"  # ... and the pid of its supervisor: its claims live as long as that
MAIN_WORKER = "main"                        # the worker of a night with one agent, or of commands run by hand
LOCK_TIMEOUT_S = 300          # a concurrent analyze takes seconds; minutes of waiting means a stuck process
STAMP_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # started_at (RunLogger) and analyzed_at
TRACEBACK_LINES = 30          # lines of a crashed run's log shown in analysis.md
LOG_HEAD_BYTES = 64 << 10     # the start of run.log that is read and archived: uv's and the imports' output, then
                              # the run's stamp line (prepare.RunLogger prints it first)
LOG_TAIL_BYTES = 1 << 20      # the end of run.log that is read and archived: the traceback and the final block, however
                              # much a run printed before (a 200 MB log is neither read whole nor copied whole)
LOG_CUT_MARK = "\n[... {n} bytes cut ...]\n"  # where an archived run.log lost its middle
MAX_METRICS_NOTES = 5         # metrics.jsonl problems listed in analysis.md (then "and N more")
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")  # atomic_write's temporary files: .<name>.<pid>.tmp


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
    """Write to a temporary file beside `path`, fsync, then rename over it: readers see old or new, never half.
    A failed write (a full disk) removes its temporary file; one a killed process left is Store.repair's."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def proc_stat(pid: int):
    """(state, ppid, start time in seconds since boot) of a process, or None once it is gone (or without /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[19]) / os.sysconf("SC_CLK_TCK")


def pid_alive(pid: int) -> bool:
    """Whether a live process has this pid (another user's counts; a zombie does not: it has exited and
    holds no file, it only waits to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = proc_stat(pid)
    return stat is None or stat[0] not in ("Z", "X")  # no /proc to tell (macOS): the process exists


def current_worker(environ=None) -> tuple:
    """(worker name, its supervisor's pid or None) of this process, from the environment supervise.py gives
    every process of a worker."""
    environ = os.environ if environ is None else environ
    pid = environ.get(WORKER_PID_ENV, "")
    return environ.get(WORKER_ENV) or MAIN_WORKER, int(pid) if pid.isdigit() else None


def worker_of(record: dict) -> str:
    """The worker a ledger row is from (rows from before workers were recorded are the single agent's)."""
    return record.get("worker") or MAIN_WORKER


def replace_non_finite(value, path: str = ""):
    """(value with every NaN / infinite float, however deeply nested, replaced by None, [paths replaced]):
    what makes a record strict JSON (runs.jsonl is written with allow_nan=False)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [path or "value"]
    if isinstance(value, dict):
        pairs = [(k, replace_non_finite(v, f"{path}.{k}" if path else str(k))) for k, v in value.items()]
        return {k: v for k, (v, _) in pairs}, [p for _, (_, ps) in pairs for p in ps]
    if isinstance(value, list):
        items = [replace_non_finite(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return [v for v, _ in items], [p for _, ps in items for p in ps]
    return value, []


# ---------------------------------------------------------------------------
# The files of one run
# ---------------------------------------------------------------------------

def _measured(key: str) -> bool:
    """A metrics key whose value must be a finite number (the step keys, validation, per-layer statistics)."""
    return key in schema.REQUIRED_STEP_KEYS or key in (schema.VAL_BPB, schema.VAL_LOSS) or bool(schema.parse_layer_key(key))


def read_metrics(path: Path):
    """(records, problems) of a metrics.jsonl. A crashed run may end in a half-written line: the
    complete lines are kept and the truncation reported, never raised. A line that is not a JSON
    object, lacks a step key or holds a value that is not a finite number (NaN, a string step, a null
    time) is skipped and reported, so the statistics and plots only ever see clean numbers."""
    path = Path(path)
    if not path.exists():
        return [], [f"{path.name} is missing"]
    records, problems = [], []
    lines = path.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"line {i + 1} of {path.name}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            problems.append(f"{where} is {'truncated' if i == len(lines) - 1 else 'not JSON'}")
            continue
        if not isinstance(record, dict):
            problems.append(f"{where} is not an object; skipped")
            continue
        bad = schema.step_record_problems(record)
        unusable = (any(k not in record for k in schema.REQUIRED_STEP_KEYS)
                    or any(_measured(k) and not schema.finite_number(v) for k, v in record.items()))
        if bad:
            problems.append(f"{where} (step {record.get(schema.STEP)!r}): {bad[0]}" + ("; skipped" if unusable else ""))
        if not unusable:
            records.append(record)
    return records, problems


def metrics_notes(problems: list) -> list:
    """The problems of a metrics.jsonl as analysis.md notes: the first few, then how many more."""
    more = len(problems) - MAX_METRICS_NOTES
    return problems[:MAX_METRICS_NOTES] + ([f"... and {more} more problems in metrics.jsonl"] if more > 0 else [])


# What analyze.py relies on each run_summary.json field being; None is always allowed (a failed run's
# summary lacks what it never measured). A field of another type is dropped with a note, never crashed on.
SUMMARY_FIELD_KINDS = {
    **dict.fromkeys(("val_bpb", "training_seconds", "total_seconds", "startup_seconds", "peak_vram_mb",
                     "mfu_percent", "total_tokens_M", "num_steps", "num_params_M", "depth", "seed",
                     "time_budget_s"), "a number"),
    **dict.fromkeys(("status", "device", "torch_version", "commit", "harness_hash", "train_sha256",
                     "started_at", "error"), "a string"),
    "dirty": "true or false",
    **dict.fromkeys(("data", "config", "causality", "compile"), "an object"),
}
KIND_CHECKS = {"a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
               "a string": lambda v: isinstance(v, str), "true or false": lambda v: isinstance(v, bool),
               "an object": lambda v: isinstance(v, dict)}
WARMUP_KEY = "CLOCK_WARMUP_STEPS"  # the one config constant the analysis computes with (steps off the clock)


def clean_summary(summary: dict) -> tuple:
    """(summary, notes): run_summary.json with every non-finite number replaced by None and every field of
    the wrong type (data or config not an object, a list for a device, ...) dropped, each with a note."""
    summary, replaced = replace_non_finite(summary)
    notes = [f"run_summary.json's {p} is not a finite number (NaN or infinite): recorded as null" for p in replaced]
    for key, kind in SUMMARY_FIELD_KINDS.items():
        value = summary.get(key)
        if value is not None and not KIND_CHECKS[kind](value):
            notes.append(f"run_summary.json's {key} is {type(value).__name__} {json.dumps(value)[:60]}, not {kind}: "
                         f"ignored")
            summary[key] = None
    warmup = (summary.get("config") or {}).get(WARMUP_KEY)
    if warmup is not None and not KIND_CHECKS["a number"](warmup):
        notes.append(f"run_summary.json's config.{WARMUP_KEY} is {json.dumps(warmup)[:60]}, not a number: ignored")
        summary["config"] = {k: v for k, v in summary["config"].items() if k != WARMUP_KEY}
    return summary, notes


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


def read_log(path: Path):
    """run.log in one streaming pass, whatever its size: {sha256, size, mtime, mtime_ns, head, text, cut,
    archived}. head is the text of its first LOG_HEAD_BYTES (where the stamp line is); text is the whole
    log, or, past LOG_HEAD_BYTES + LOG_TAIL_BYTES, its last LOG_TAIL_BYTES from a line start (where the
    traceback is); cut is how many bytes neither holds; archived is what goes into the archive: the
    whole log, or head, a cut mark and tail. None when there is no run.log."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    digest, tail, cut = hashlib.sha256(), bytearray(), 0
    with f:
        stat = os.fstat(f.fileno())
        head = f.read(LOG_HEAD_BYTES)
        digest.update(head)
        while chunk := f.read(schema.HASH_CHUNK_BYTES):
            digest.update(chunk)
            tail += chunk
            if len(tail) > LOG_TAIL_BYTES:
                cut += len(tail) - LOG_TAIL_BYTES
                del tail[:len(tail) - LOG_TAIL_BYTES]
    if cut:  # start the tail at a line, so the traceback reads cleanly
        start = tail.find(b"\n") + 1
        cut += start
        del tail[:start]
    archived = head + (LOG_CUT_MARK.format(n=cut).encode() if cut else b"") + bytes(tail)
    return {"sha256": digest.hexdigest(), "size": stat.st_size, "mtime": stat.st_mtime, "mtime_ns": stat.st_mtime_ns,
            "head": head.decode(errors="replace"), "cut": cut, "archived": archived,
            "text": (tail if cut else head + tail).decode(errors="replace")}


def file_identity(path: Path):
    """(sha256, mtime_ns) of a file, hashed in chunks; (None, None) when it does not exist. Two runs that
    left byte-identical files (two SyntaxErrors) are still told apart by when each was written."""
    path = Path(path)
    try:
        mtime_ns = path.stat().st_mtime_ns
    except FileNotFoundError:
        return None, None
    return schema.sha256_file(path), mtime_ns


def refuse_running_train(run_dir):
    """Refuse while a train.py still runs in `run_dir`: it holds an exclusive flock on its RUN_LOCK_FILE
    for its whole life (prepare.RunLogger), with its pid written in it."""
    path = Path(run_dir) / schema.RUN_LOCK_FILE
    try:
        f = open(path)
    except FileNotFoundError:
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = f.read().strip() or "?"
            raise StoreError(f"train.py is still running in {Path(run_dir).resolve()} (pid {pid}): wait for it to "
                             f"finish, then run analyze.py") from None
        fcntl.flock(f, fcntl.LOCK_UN)


def load_run(run_dir) -> dict:
    """The files train.py left in `run_dir`, as found (nothing is checked against the store here)."""
    run_dir = Path(run_dir)
    summary, summary_problem, summary_sha256 = None, None, None
    summary_path = run_dir / "run_summary.json"
    if summary_path.exists():
        data = summary_path.read_bytes()
        summary_sha256 = sha256_bytes(data)
        try:
            summary = json.loads(data.decode(errors="replace"))
            if not isinstance(summary, dict):
                summary, summary_problem = None, "run_summary.json is not an object"
        except (json.JSONDecodeError, RecursionError) as e:
            summary_problem = f"run_summary.json is corrupt ({getattr(e, 'msg', 'nested too deeply')})"
    log = read_log(run_dir / "run.log")
    records, metrics_problems = read_metrics(run_dir / "metrics.jsonl")
    metrics_sha256, metrics_mtime_ns = file_identity(run_dir / "metrics.jsonl")
    return {
        "dir": run_dir, "summary": summary, "summary_problem": summary_problem, "summary_sha256": summary_sha256,
        "records": records, "metrics_problems": metrics_problems,
        "log": log["text"] if log else None, "log_file": log,
        "metrics_sha256": metrics_sha256, "metrics_mtime_ns": metrics_mtime_ns,
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
        """Exclusive lock on the store, for every writer of every worker of a night. A POSIX record lock
        (fcntl.lockf: F_SETLK on the whole file) rather than flock: on NFS it is held by the server's lock
        manager (NLM for NFSv3, the protocol itself for v4), so writers on different hosts of a shared
        filesystem exclude each other; the OS releases it when the process dies. POSIX locks belong to the
        process, so one process must not take it twice (analyze.py takes it once per command)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.path(LOCK_FILE), "a") as f:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:  # EACCES or EAGAIN while another process holds it
                    if e.errno not in (errno.EACCES, errno.EAGAIN):
                        raise
                    if time.monotonic() > deadline:
                        raise StoreError(f"another analyze.py has held {self.path(LOCK_FILE)} for "
                                         f"{timeout:.0f} s; is one stuck? (ps aux | grep analyze.py)") from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.lockf(f, fcntl.LOCK_UN)

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
        """Replace runs.jsonl (strict JSON: a NaN left in an old record becomes null), then results.tsv
        written from it (call under lock())."""
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path(RUNS_JSONL), "".join(json.dumps(replace_non_finite(r)[0], sort_keys=True, allow_nan=False)
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

    def stale_temp_files(self) -> list:
        """atomic_write's temporary files whose process is gone (a kill between write and rename): in the
        store, in its run folders, and train.py's beside it (discard writes train.py atomically)."""
        candidates = [*self.dir.glob(".*.tmp"), *self.dir.glob("*/.*.tmp"), *self.root.glob(f".{TRAIN_PY}.*.tmp")]
        stale = []
        for path in sorted(candidates):
            match = TEMP_NAME.match(path.name)
            if match and path.is_file() and not pid_alive(int(match["pid"])):
                stale.append(path)
        return stale

    def repair(self) -> list:
        """Undo what a killed analyze.py left, and say so (call first under lock(): no other analyze.py is
        half-way then, so whatever is half-done is a dead process's). Returns one note per repair:
        - temporary files of dead processes are removed;
        - archive folders with no ledger row (an analyze killed before it recorded its run; the run's files
          are still where train.py left them) are removed, so analyzing the run again archives it once;
        - results.tsv is rewritten from runs.jsonl where it differs (a kill between the two writes)."""
        notes = []
        if not self.dir.exists():
            return notes
        stale = self.stale_temp_files()
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            notes.append(f"removed {len(stale)} temporary file(s) left by killed processes: "
                         + ", ".join(str(p.relative_to(self.root)) for p in stale[:3]) + (" ..." if len(stale) > 3 else ""))
        ledger = self.read_ledger()
        orphans = self.orphans(ledger)
        for run_id in orphans:
            shutil.rmtree(self.run_path(run_id))
        if orphans:
            notes.append(f"removed archive folder(s) {', '.join(orphans)} with no ledger row, left by an analyze.py "
                         f"killed before it recorded its run (`uv run analyze.py` archives that run again)")
        tsv = self.path(RESULTS_TSV)
        if (ledger or tsv.exists()) and (tsv.read_text() if tsv.exists() else None) != tsv_text(ledger):
            atomic_write(tsv, tsv_text(ledger))
            notes.append(f"rebuilt {RESULTS_TSV} from {RUNS_JSONL}: it did not match (a write was cut short)")
        return notes

    def recorded(self, run_id: str) -> bool:
        """Whether the ledger has a row for `run_id`."""
        return any(r["run_id"] == run_id for r in self.read_ledger())

    def archived_records(self, run_id: str):
        records, _ = read_metrics(self.run_path(run_id) / "metrics.jsonl")
        return records
