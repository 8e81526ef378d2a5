"""
The contract every piece shares, defined once: the keys of `metrics.jsonl` and `run_summary.json`
and their validators, the names of a run's files and of the prepare cache, the timestamp format,
what the harness is and its hash, the seal, the one error class and the one atomic write.

train.py writes its files through the harness's run logger (harness/runlog.py); analyze.py, the
tests and program.md read them by the names below. Standard library only, so the analysis and the
night use it without paying for torch.
"""

import hashlib
import json
import math
import os
from datetime import datetime
from pathlib import Path

from harness import settings


class HarnessError(Exception):
    """A user-facing refusal or failure: printed as one `error: ...` line, never a traceback."""


# ---------------------------------------------------------------------------
# The files of a run, of the prepare cache, and the time stamps
# ---------------------------------------------------------------------------

RUN_METRICS = "metrics.jsonl"
# what every entry point (launch.py, analyze.py, supervise.py) creates files with: the store, the
# seals, the logs and the run's files are readable by their owner only, however they are run
PRIVATE_UMASK = 0o077
RUN_SUMMARY = "run_summary.json"
RUN_LOG = "run.log"
# flock-held by a running train.py in its directory: analyze.py waits
RUN_LOCK_FILE = ".train.lock"
TRAIN_PY = "train.py"                  # the agent's file
LAUNCH_PY = "launch.py"                # the one training command's script
TRAIN_COMMAND = "uv run launch.py"  # program.md's one training command
MANIFEST = "manifest.json"             # what prepare.py prepared, in the cache
DATA_DIR = "data"                      # the prepared corpus, in the cache
TOKENIZER_DIR = "tokenizer"            # tokenizer.pkl and token_bytes.npy, in the cache
TOKENIZER_FILE = "tokenizer.pkl"       # the BPE tokenizer, in the tokenizer folder
TOKEN_BYTES_FILE = "token_bytes.npy"   # each token's UTF-8 length, beside it
SEALS_DIR = "seals"                    # the harness's seals of finished runs, in the cache
STAMP_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # started_at (the run logger) and analyzed_at (analyze.py)
# the first line a run prints (so run.log's), then its started_at
LOG_STAMP_PREFIX = "run started_at: "


def cache_path(*parts) -> Path:
    """A path in the prepare cache ($AUTORESEARCH_CACHE), e.g. cache_path(MANIFEST)."""
    return settings.CACHE_DIR.joinpath(*parts)


def stamp(t: float = None) -> str:
    """A wall-clock time as every record writes it."""
    import time
    return time.strftime(STAMP_FORMAT, time.localtime(t))


def parse_stamp(text):
    """Epoch seconds of a STAMP_FORMAT time stamp, or None."""
    try:
        return datetime.strptime(text, STAMP_FORMAT).timestamp()
    except (TypeError, ValueError):
        return None


def log_stamp(started_at: str) -> str:
    """The line a run prints first: a run.log without its summary's stamp is another (later)
    process's log."""
    return f"{LOG_STAMP_PREFIX}{started_at}"


def atomic_write(path, data, mode: str = "w"):
    """Write to a temporary file beside `path`, fsync, then rename over it: readers see old or new,
    never half. A failed write (a full disk) removes its temporary file and raises an OSError that
    names `path` (the temporary name is gone, and means nothing to the user); one a killed process
    left is the store's repair's (analysis/store.py)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e  # errno keeps its subclass
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

# ---------------------------------------------------------------------------
# metrics.jsonl: one line per step
# ---------------------------------------------------------------------------

STEP = "step"                          # 0-based optimizer step
# training clock (s): excludes startup, compile warmup and evals
TIME_S = "time_s"
TRAIN_LOSS = "train/loss"              # loss of this step's last micro-batch (nats/token)
TRAIN_LOSS_SMOOTH = "train/loss_smooth"  # bias-corrected EMA of train/loss
LR_MULTIPLIER = "train/lr_multiplier"  # schedule multiplier applied to every group's base lr
MUON_MOMENTUM = "train/muon_momentum"
WEIGHT_DECAY = "train/weight_decay"    # Muon weight decay in effect this step
PROGRESS = "train/progress"            # fraction of TIME_BUDGET used, in [0, 1]
STEP_TIME_MS = "perf/step_time_ms"     # wall time of this step (ms)
TOKENS_PER_SEC = "perf/tokens_per_sec"
MFU_PERCENT = "perf/mfu_percent"       # 0 where the device's peak FLOPs are unknown (CPU, MPS)

REQUIRED_STEP_KEYS = (
    STEP, TIME_S, TRAIN_LOSS, TRAIN_LOSS_SMOOTH, LR_MULTIPLIER, MUON_MOMENTUM,
    WEIGHT_DECAY, PROGRESS, STEP_TIME_MS, TOKENS_PER_SEC, MFU_PERCENT,
)

# Stamped on every line by the harness (harness/runlog.py), never by train.py: the training clock's
# witness. Between two lines the wall clock advances by the step's time plus the evaluations in
# between, so a step time that train.py under-reports (compute moved off the clock) shows.
# seconds since harness/runlog.py's Run started (time.monotonic, read by the harness)
WALL_S = "harness/wall_s"
EVAL_S = "harness/eval_s"              # seconds the harness spent in evaluate_val so far
HARNESS_STEP_KEYS = (WALL_S, EVAL_S)
# Derived by the harness from the step's own fields (harness/runlog.py), never supplied by train.py,
# so that the smoothed loss, the progress, the throughput and the MFU mean the same in every run.
DERIVED_STEP_KEYS = (TRAIN_LOSS_SMOOTH, PROGRESS, TOKENS_PER_SEC, MFU_PERCENT)
# The agent's own metrics: any finite number under this prefix (analysis.md lists them, a plot shows
# them).
AGENT_PREFIX = "agent/"

# Periodic keys: present only on the steps where they were measured.
VAL_BPB = "val/bpb"                    # bits per byte on the small fixed validation slice
VAL_LOSS = "val/loss"                  # nats per token on the same slice: same units as train/loss
LAYER_PREFIX = "layer/"
LAYER_STATS = ("grad_norm", "weight_norm", "update_ratio")


def layer_key(param_name: str, stat: str) -> str:
    """Metrics key of one per-parameter statistic, e.g. layer/h.0.attn.c_q.weight/grad_norm."""
    assert stat in LAYER_STATS, f"unknown layer stat {stat!r}; expected one of {LAYER_STATS}"
    return f"{LAYER_PREFIX}{param_name}/{stat}"


def parse_layer_key(key: str):
    """Inverse of layer_key: (param_name, stat), or None for a key that is not per-layer."""
    if not key.startswith(LAYER_PREFIX):
        return None
    name, _, stat = key[len(LAYER_PREFIX):].rpartition("/")
    return (name, stat) if name and stat in LAYER_STATS else None


# ---------------------------------------------------------------------------
# run_summary.json: one object per run
# ---------------------------------------------------------------------------

# Ledger statuses (results.tsv, runs.jsonl), set by analyze.py.
STATUSES = ("pending", "keep", "discard", "rerun", "crash", "nan", "timeout", "invalid")
# What train.py itself writes into run_summary.json: "ok" is a finished run awaiting a verdict.
TRAIN_STATUSES = ("ok", "crash", "nan", "timeout")

SUMMARY_KEYS = (
    "status", "val_bpb", "training_seconds", "total_seconds", "startup_seconds",
    "peak_vram_mb", "mfu_percent", "total_tokens_M", "num_steps", "num_params_M",
    "depth", "seed", "device", "torch_version", "commit", "dirty", "data",
    "harness_hash", "train_sha256", "config",
    # the evaluator's probes: ok, max_change of earlier logits, positions (the cuts), rows, probes
    "causality",
    # the harness's own functions and classes as imported, checked at the final evaluation
    # (harness/selfcheck.py): ok, changed (the names train.py rebound or whose code it replaced)
    "harness_check",
    # launch.py's evaluator, a process train.py never ran in (harness/evaluation.py): rows,
    # batch_size, seconds, device, val_loss, and train_process_s (train.py's whole wall time)
    "evaluator",
    # what the run logger wrote into metrics.jsonl: its sha256 and line count (the seal checks them)
    "metrics_sha256", "metrics_lines",
    # the most steps any one optimizer took before run.start_clock (torch's global step hook)
    "pre_clock_optimizer_steps",
    # on the compiled (fast) path: backend, graphs, graph_breaks, recompiles (+ reasons), and
    # graphs_in_loop / recompiles_in_loop, compiled after the training clock started (0 expected)
    "compile",
)

# The `---` block a finished run prints at the end, in this order, so `grep "^val_bpb:" run.log`
# works.
FINAL_BLOCK_KEYS = (
    "val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
    "total_tokens_M", "num_steps", "num_params_M", "depth",
)
WARMUP_KEY = "CLOCK_WARMUP_STEPS"  # the config constant of the steps kept off the training clock


def warmup_steps(summary: dict) -> int:
    """The steps a run kept off its training clock (its config's CLOCK_WARMUP_STEPS; 0 without
    one)."""
    value = (summary.get("config") or {}).get(WARMUP_KEY, 0)
    return int(value) if finite_number(value) else 0


# ---------------------------------------------------------------------------
# The harness, its hash, and the identity of the prepared data
# ---------------------------------------------------------------------------

HARNESS_PACKAGE = "harness"   # the fixed harness: every .py file in it, and prepare.py, are hashed
HARNESS_FILES = ("prepare.py",)
# What must stay unchanged in a store, compared by content (harness/fixed.py): the hashed
# harness, what launches and judges the runs, and the night that watches them.
FIXED_PATHSPECS = (*HARNESS_FILES, HARNESS_PACKAGE, "launch.py", "analyze.py", "analysis",
                   "supervise.py", "night")
HARNESS_MODULES = ("prepare", HARNESS_PACKAGE)  # what a train.py imports of the fixed harness
# files are hashed in 1 MiB reads: a ~100 MB val shard never sits in memory
HASH_CHUNK_BYTES = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path, chunk: int = HASH_CHUNK_BYTES) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def harness_files(root) -> list:
    """The files of the harness in `root`, relative, in the order they are hashed."""
    root = Path(root)
    package = sorted(p.relative_to(root).as_posix() for p in (root / HARNESS_PACKAGE).glob("*.py"))
    return [*HARNESS_FILES, *package]


def harness_hash(root) -> str:
    """16 hex digits of sha256 over the name and content of every harness file in `root`."""
    h = hashlib.sha256()
    for name in harness_files(root):
        h.update(name.encode() + b"\0" + (Path(root) / name).read_bytes())
    return h.hexdigest()[:16]


def manifest_hash(manifest: dict) -> str:
    """16 hex digits of sha256 over a manifest's content: everything but its own hash and creation
    time, so re-preparing the same data keeps the hash, and an edited manifest.json no longer
    matches."""
    content = {k: v for k, v in manifest.items() if k not in ("manifest_hash", "created")}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


# The seal: what the harness wrote, kept outside the run directory (in the prepare cache), so a
# summary or metrics file that train.py rewrote, appended to or wrote itself no longer matches.

def seal_path(run_dir, started_at: str) -> Path:
    """Where the harness seals the run that started at `started_at` in `run_dir`."""
    key = hashlib.sha256(f"{Path(run_dir).resolve()}\0{started_at}".encode()).hexdigest()[:16]
    return cache_path(SEALS_DIR, f"{key}.json")


# Who wrote a seal: the harness's runner, once its evaluator measured the model; or the tests'
# synthetic-run helper (tests/synthetic.py), for runs that never trained: analyze.py takes such a
# run only where AUTORESEARCH_ACCEPT_SYNTHETIC=1 says so, and calls it invalid everywhere else.
SEALED_BY_EVALUATOR = "evaluator"
SEALED_BY_SYNTHETIC = "tests/synthetic.py"


def write_seal(run_dir, started_at: str, summary_text: str, metrics_sha256: str, metrics_lines: int,
               val_bpb, sealed_by: str = SEALED_BY_EVALUATOR):
    """Seal a run's files as the harness wrote them: the summary's sha256, the metrics' sha256 and
    line count, the val_bpb the harness computed itself (None for a run that did not finish), and
    who sealed them."""
    seal = {"summary_sha256": sha256_bytes(summary_text.encode()), "metrics_sha256": metrics_sha256,
            "metrics_lines": metrics_lines, "val_bpb": val_bpb, "sealed_by": sealed_by}
    path = seal_path(run_dir, started_at)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(seal) + "\n")


# ---------------------------------------------------------------------------
# Validation (pure functions: a list of problems, empty when the record is valid)
# ---------------------------------------------------------------------------

def finite_number(v) -> bool:
    """A real, finite number (not a bool, None, NaN or inf): what every metric value must be."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def step_record_problems(rec: dict) -> list:
    problems = [f"missing {k}" for k in REQUIRED_STEP_KEYS if k not in rec]
    for k, v in rec.items():
        if (k in REQUIRED_STEP_KEYS or k in (VAL_BPB, VAL_LOSS) or k in HARNESS_STEP_KEYS
            or parse_layer_key(k)
            or (isinstance(k, str) and k.startswith(AGENT_PREFIX) and len(k) > len(AGENT_PREFIX))):
            if not finite_number(v):
                problems.append(f"{k}={v!r} is not a finite number")
        else:
            problems.append(f"unknown key {k}")
    return problems


def summary_problems(summary: dict) -> list:
    problems = [f"missing {k}" for k in SUMMARY_KEYS if k not in summary]
    if summary.get("status") not in TRAIN_STATUSES:
        problems.append(f"status {summary.get('status')!r} not in {TRAIN_STATUSES}")
    if summary.get("status") == "ok" and not finite_number(summary.get("val_bpb")):
        problems.append("status ok but val_bpb is not a finite number")
    if not isinstance(summary.get("config"), dict):
        problems.append("config is not an object")
    return problems
