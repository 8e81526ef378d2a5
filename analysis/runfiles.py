"""
The files a training run leaves behind, read defensively, and whose they are: run.log streamed and
bounded, bad metrics lines and summary fields skipped with a note, and the files already archived,
or written by another (later or earlier) process, told apart from this run's own.
"""

import difflib
import fcntl
import hashlib
import json
import math
import os
from pathlib import Path

from harness import contract, git, slurm
from harness.contract import HarnessError
from analysis import verdict

TRACEBACK_LINES = 30          # lines of a crashed run's log shown in analysis.md
# the start of run.log that is read and archived: uv's and the imports' output, then the run's
# stamp line (the run logger prints it first)
LOG_HEAD_BYTES = 64 << 10
LOG_TAIL_BYTES = 1 << 20      # the end of run.log that is read and archived: the traceback and the
                              # final block, however much a run printed (200 MB are neither read
                              # whole nor copied whole)
LOG_CUT_MARK = "\n[... {n} bytes cut ...]\n"  # where an archived run.log lost its middle
MAX_METRICS_NOTES = 5         # metrics.jsonl problems listed in analysis.md (then "and N more")
LOG_CLOCK_SLACK_S = 2.0       # started_at has 1 s resolution; a run.log last written before that is
                              # not this run's


def replace_non_finite(value, path: str = ""):
    """(value with every NaN / infinite float, however deeply nested, replaced by None, [paths
    replaced]): what makes a record strict JSON (runs.jsonl is written with allow_nan=False)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [path or "value"]
    if isinstance(value, dict):
        pairs = [(k, replace_non_finite(v, f"{path}.{k}" if path else str(k)))
                 for k, v in value.items()]
        return {k: v for k, (v, _) in pairs}, [p for _, (_, ps) in pairs for p in ps]
    if isinstance(value, list):
        items = [replace_non_finite(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return [v for v, _ in items], [p for _, ps in items for p in ps]
    return value, []


# ---------------------------------------------------------------------------
# The files of one run
# ---------------------------------------------------------------------------

def _measured(key: str) -> bool:
    """A metrics key whose value must be a finite number (the step keys, validation, per-layer
    statistics)."""
    return (key in contract.REQUIRED_STEP_KEYS or key in (contract.VAL_BPB, contract.VAL_LOSS)
            or bool(contract.parse_layer_key(key)))


def read_metrics(path: Path):
    """(records, problems) of a metrics.jsonl. A crashed run may end in a half-written line: the
    complete lines are kept and the truncation reported, never raised. A line that is not a JSON
    object, lacks a step key or holds a value that is not a finite number (NaN, a string step, a
    null time) is skipped and reported, so the statistics and plots only ever see clean numbers."""
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
        bad = contract.step_record_problems(record)
        unusable = (any(k not in record for k in contract.REQUIRED_STEP_KEYS)
                    or any(_measured(k) and not contract.finite_number(v)
                           for k, v in record.items()))
        if bad:
            problems.append(f"{where} (step {record.get(contract.STEP)!r}): {bad[0]}"
                            + ("; skipped" if unusable else ""))
        if not unusable:
            records.append(record)
    return records, problems


def metrics_notes(problems: list) -> list:
    """The problems of a metrics.jsonl as analysis.md notes: the first few, then how many more."""
    more = len(problems) - MAX_METRICS_NOTES
    return problems[:MAX_METRICS_NOTES] + ([f"... and {more} more problems in metrics.jsonl"]
                                           if more > 0 else [])


# What analyze.py relies on each run_summary.json field being; None is always allowed (a failed
# run's summary lacks what it never measured). A field of another type is dropped with a note, never
# crashed on.
SUMMARY_FIELD_KINDS = {
    **dict.fromkeys(("val_bpb", "training_seconds", "total_seconds", "startup_seconds",
                     "peak_vram_mb", "mfu_percent", "total_tokens_M", "num_steps", "num_params_M",
                     "depth", "seed", "time_budget_s"), "a number"),
    **dict.fromkeys(("status", "device", "torch_version", "commit", "harness_hash", "train_sha256",
                     "started_at", "error"), "a string"),
    "dirty": "true or false",
    **dict.fromkeys(("data", "config", "causality", "compile"), "an object"),
}
KIND_CHECKS = {"a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
               "a string": lambda v: isinstance(v, str),
               "true or false": lambda v: isinstance(v, bool),
               "an object": lambda v: isinstance(v, dict)}


def clean_summary(summary: dict) -> tuple:
    """(summary, notes): run_summary.json with every non-finite number replaced by None and every
    field of the wrong type (data or config not an object, a list for a device, ...) dropped, each
    with a note."""
    summary, replaced = replace_non_finite(summary)
    notes = [f"run_summary.json's {p} is not a finite number (NaN or infinite): recorded as null"
             for p in replaced]
    for key, kind in SUMMARY_FIELD_KINDS.items():
        value = summary.get(key)
        if value is not None and not KIND_CHECKS[kind](value):
            notes.append(f"run_summary.json's {key} is {type(value).__name__} "
                         f"{json.dumps(value)[:60]}, not {kind}: ignored")
            summary[key] = None
    warmup = (summary.get("config") or {}).get(contract.WARMUP_KEY)
    if warmup is not None and not KIND_CHECKS["a number"](warmup):
        notes.append(f"run_summary.json's config.{contract.WARMUP_KEY} is "
                     f"{json.dumps(warmup)[:60]}, not a number: ignored")
        summary["config"] = {k: v for k, v in summary["config"].items()
                             if k != contract.WARMUP_KEY}
    return summary, notes


def _last_traceback(lines: list):
    """(start, end) of the last Python traceback in log lines, end just past its exception line
    (output printed after it, such as exit-time warnings, is not part of it); None without one."""
    starts = [i for i, line in enumerate(lines)
              if line.startswith("Traceback (most recent call last)")]
    if not starts:
        return None
    end = next((i + 1 for i in range(starts[-1] + 1, len(lines))
                if lines[i] and not lines[i][0].isspace()), len(lines))
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
    """run.log in one streaming pass, whatever its size: {sha256, size, mtime, mtime_ns, head, text,
    cut, archived}. head is the text of its first LOG_HEAD_BYTES (where the stamp line is); text is
    the whole log, or, past LOG_HEAD_BYTES + LOG_TAIL_BYTES, its last LOG_TAIL_BYTES from a line
    start (where the traceback is); cut is how many bytes neither holds; archived is what goes into
    the archive: the whole log, or head, a cut mark and tail. None when there is no run.log."""
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
        while chunk := f.read(contract.HASH_CHUNK_BYTES):
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
    return {"sha256": digest.hexdigest(), "size": stat.st_size, "mtime": stat.st_mtime,
            "mtime_ns": stat.st_mtime_ns,
            "head": head.decode(errors="replace"), "cut": cut, "archived": archived,
            "text": (tail if cut else head + tail).decode(errors="replace")}


def file_identity(path: Path):
    """(sha256, mtime_ns) of a file, hashed in chunks; (None, None) when it does not exist. Two runs
    that left byte-identical files (two SyntaxErrors) are still told apart by when each was
    written."""
    path = Path(path)
    try:
        mtime_ns = path.stat().st_mtime_ns
    except FileNotFoundError:
        return None, None
    return contract.sha256_file(path), mtime_ns


def refuse_running_train(run_dir):
    """Refuse while a run still trains in `run_dir`: launch.py (or a train.py run on its own) holds
    an exclusive flock on its RUN_LOCK_FILE until the run is sealed, with its pid written in it."""
    path = Path(run_dir) / contract.RUN_LOCK_FILE
    try:
        f = open(path)
    except FileNotFoundError:
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = f.read().strip() or "?"
            raise HarnessError(f"a run is still training in {Path(run_dir).resolve()} "
                               f"(pid {pid}): wait for it to finish, then run analyze.py") from None
        fcntl.flock(f, fcntl.LOCK_UN)


def load_run(run_dir) -> dict:
    """The files train.py left in `run_dir`, as found (nothing is checked against the store
    here)."""
    run_dir = Path(run_dir)
    summary, summary_problem, summary_sha256 = None, None, None
    summary_path = run_dir / contract.RUN_SUMMARY
    if summary_path.exists():
        data = summary_path.read_bytes()
        summary_sha256 = contract.sha256_bytes(data)
        try:
            summary = json.loads(data.decode(errors="replace"))
            if not isinstance(summary, dict):
                summary, summary_problem = None, "run_summary.json is not an object"
        except (json.JSONDecodeError, RecursionError) as e:
            summary_problem = (f"run_summary.json is corrupt "
                               f"({getattr(e, 'msg', 'nested too deeply')})")
    log = read_log(run_dir / contract.RUN_LOG)
    records, metrics_problems = read_metrics(run_dir / contract.RUN_METRICS)
    metrics_sha256, metrics_mtime_ns = file_identity(run_dir / contract.RUN_METRICS)
    return {
        "dir": run_dir, "summary": summary, "summary_problem": summary_problem,
        "summary_sha256": summary_sha256,
        "records": records, "metrics_problems": metrics_problems,
        "log": log["text"] if log else None, "log_file": log,
        "metrics_sha256": metrics_sha256, "metrics_mtime_ns": metrics_mtime_ns,
    }




def archived_as(ledger: list, kind: str, sha256, mtime_ns):
    """The run id whose archived `kind` file ("run_log", "metrics") was this one: the same sha256
    and the same mtime (two SyntaxError runs leave identical logs, written at different times). A
    record from before mtimes were recorded matches on its sha256 alone."""
    if sha256 is None:
        return None
    return next((r["run_id"] for r in ledger if r.get(f"{kind}_sha256") == sha256
                 and r.get(f"{kind}_mtime_ns", mtime_ns) == mtime_ns), None)


def log_relation(log_file: dict, summary: dict) -> str:
    """Whose run.log this is, next to `summary`: "own" (it carries the summary's stamp line, which
    the harness's run logger prints first), "older" (last written before that run started: a run
    not captured with `> run.log`), or "later": written after that run started without its stamp,
    so by a later process that died before train.py called start_run (a SyntaxError, a kill during
    the imports) and wrote no summary of its own. A summary without a usable started_at is taken
    as the log's own."""
    stamp = summary.get("started_at")
    if not isinstance(stamp, str):
        return "own"
    start = contract.parse_stamp(stamp)
    if start is not None and log_file["mtime"] < start - LOG_CLOCK_SLACK_S:
        return "older"
    stamped = any(line.rstrip().endswith(contract.log_stamp(stamp))
                  for line in log_file["head"].splitlines())
    return "own" if stamped else "later"


def classify(run: dict, ledger: list) -> dict:
    """Decide which of the files found belong to this run, and its status.

    Files already archived (matched by run.log / metrics.jsonl hash and mtime, or the summary's
    start time and code) are an earlier run's, and so is a summary whose stamp line a later run.log
    lacks: a new run.log next to an old summary means this run died before train.py called
    start_run, which is a crash, never the old number."""
    if (run["summary"] is None and run["log"] is None and not run["records"]
            and run["summary_problem"] is None):
        raise HarnessError(f"no run to analyze in {run['dir'].resolve()}: run "
                           f"`{contract.TRAIN_COMMAND}` first")
    summary, records, log, notes = _own_files(run, ledger)
    status, error = _run_status(summary, log, run["summary_problem"])
    return {"summary": summary, "records": records, "log": log, "status": status, "error": error,
            "notes": notes}


def _summary_archived_as(ledger: list, summary, summary_sha256):
    """The run id whose archived run_summary.json this one is: the same start time, code and
    sha256 (the same file: workers start the same code in one second); None for a summary without
    a start time."""
    if summary is None or not summary.get("started_at"):
        return None
    return next((r["run_id"] for r in ledger if r.get("started_at") == summary["started_at"]
                 and r.get("train_sha256") == summary.get("train_sha256")
                 and r.get("summary_sha256", summary_sha256) == summary_sha256), None)


def _own_files(run: dict, ledger: list) -> tuple:
    """(summary, records, log, notes): the files of `run` that are this run's own; an earlier
    run's is None (or no records), with a note that says whose it is. Raises when none of the files
    is new."""
    records, log, log_file = run["records"], run["log"], run["log_file"]
    summary, summary_fixes = (clean_summary(run["summary"]) if run["summary"] is not None
                              else (None, []))
    log_of = (archived_as(ledger, "run_log", log_file["sha256"], log_file["mtime_ns"])
              if log_file else None)
    metrics_of = (archived_as(ledger, "metrics", run["metrics_sha256"], run["metrics_mtime_ns"])
                  if records else None)
    summary_of = _summary_archived_as(ledger, summary, run["summary_sha256"])
    relation = log_relation(log_file, summary) if summary is not None and log_file else None
    notes = []
    if relation == "later" and not summary_of:
        notes.append(f"run_summary.json belongs to an earlier run (started at "
                     f"{summary['started_at']}) that was never analyzed: run.log was written after "
                     f"it and lacks its stamp line "
                     f"({contract.log_stamp(summary['started_at'])!r}), so this run failed before "
                     f"train.py called start_run; that earlier result, and its metrics.jsonl, are "
                     f"ignored")
        summary, records = None, []
    anything_new = ((log is not None and not log_of) or (summary is not None and not summary_of)
                    or (records and not metrics_of) or run["summary_problem"])
    if not anything_new:
        raise HarnessError(f"this run is already archived as {log_of or summary_of or metrics_of}: "
                           f"train again (`{contract.TRAIN_COMMAND}`) before analyzing")
    if summary_of:
        notes.append(f"run_summary.json belongs to run {summary_of} (already archived): this run "
                     f"wrote none, so it failed before train.py called start_run; that earlier "
                     f"result is ignored")
        summary = None
    if metrics_of:
        notes.append(f"metrics.jsonl belongs to run {metrics_of} (already archived); ignored")
        records = []
    elif run["metrics_problems"] and (summary or records):
        notes.extend(metrics_notes(run["metrics_problems"]))
    if log_of:
        notes.append(f"run.log belongs to run {log_of}, not to this run: capture it with "
                     f"`{contract.TRAIN_COMMAND}`")
        log = None
    elif relation == "older" and summary is not None:
        notes.append("run.log was last written before this run started, so it is not this run's; "
                     f"capture it with `{contract.TRAIN_COMMAND}`")
        log = None
    if summary is not None:
        notes.extend(summary_fixes)
    return summary, records, log, notes


def _run_status(summary, log, summary_problem) -> tuple:
    """(status, error) of a run from its own summary and log: without a summary it is a crash; a
    job the scheduler ended (cancelled, pre-empted, out of time, never started) says so first."""
    error = None
    if summary is None:
        status = "crash"
        error = summary_problem or failure_line(log) or (
            "no run_summary.json: the process died without writing one (killed, out of memory, or "
            "it failed before train.py called start_run)"
            + (f"; run.log ends with: {log.strip().splitlines()[-1][:200]}"
               if log and log.strip() else ""))
    elif summary.get("status") == "ok":
        status = "ok"
        if not verdict.finished({"val_bpb": summary.get("val_bpb")}):
            status, error = "crash", "run_summary.json says ok but has no finite val_bpb"
    elif summary.get("status") in verdict.FAILED_STATUSES:
        status, error = summary["status"], summary.get("error")
    else:
        status, error = "crash", f"run_summary.json has an unknown status {summary.get('status')!r}"
    ended = slurm.run_failure(log) if status != "ok" else None
    if ended:  # the scheduler ended the job: its words first
        status = ended[0] if status == "crash" else status
        error = ended[1] + (f"; train.py: {error}"
                            if error and not error.startswith("no run_summary.json") else "")
    return status, error


def ran_code(run_dir: Path, summary) -> tuple:
    """(train.py text, exact) of the code that ran: the working copy or the commit's, whichever
    matches the summary's train_sha256; else the working copy, flagged as possibly not what ran."""
    candidates = []
    for folder in dict.fromkeys((run_dir, Path("."))):
        if (folder / contract.TRAIN_PY).exists():
            candidates.append((folder / contract.TRAIN_PY).read_text())
    committed = git.show((summary or {}).get("commit"))
    if committed is not None:
        candidates.append(committed)
    wanted = (summary or {}).get("train_sha256")
    for text in candidates:
        if wanted and contract.sha256_bytes(text.encode()) == wanted:
            return text, True
    if not candidates:
        raise HarnessError("no train.py in the working directory to archive")
    return candidates[0], wanted is None


def unified_diff(old: str, new: str, old_label: str, new_label: str) -> str:
    ensure = (lambda t: t if t.endswith("\n") else t + "\n")
    return "".join(difflib.unified_diff(ensure(old).splitlines(True), ensure(new).splitlines(True),
                                        fromfile=f"a/train.py ({old_label})",
                                        tofile=f"b/train.py ({new_label})"))


