"""
Every setting of auto-log-research, in one place: the constants that keep runs comparable, the
limits of one run in their one order, and every AUTORESEARCH_* environment variable, each read and
validated here, once, when this module is imported. A bad value ends the process at once with one
`error:` line (exit 1): a run must never train under a budget of -1, nor a night start under a keep
policy nobody chose.

No import beyond the standard library: the analysis and the night read their settings here too.
"""

import json
import math
import os
import re
from pathlib import Path

# ---------------------------------------------------------------------------
# What keeps runs comparable: fixed for every run of a store
# ---------------------------------------------------------------------------

MAX_SEQ_LEN = 2048                # context length of training and of the evaluation
# training seconds per run (startup, compilation, evaluations excluded)
DEFAULT_TIME_BUDGET_S = 300
EVAL_TOKENS = 40 * 524288         # tokens behind the final val_bpb on CUDA (as in autoresearch)
VAL_CURVE_TOKENS = 2 * 524288     # per validation-curve point on CUDA: ~5 % of the final evaluation
# the final val_bpb off CUDA: a CPU run is a smoke test, not research
CPU_EVAL_TOKENS = 8 * MAX_SEQ_LEN
CPU_VAL_CURVE_TOKENS = 2 * MAX_SEQ_LEN
VOCAB_SIZE = 8192                 # BPE vocabulary prepare.py trains by default

# ---------------------------------------------------------------------------
# The environment: every variable's name, defined once
# ---------------------------------------------------------------------------

CACHE_ENV = "AUTORESEARCH_CACHE"
DATA_URL_ENV = "AUTORESEARCH_DATA_URL"
TIME_BUDGET_ENV = "AUTORESEARCH_TIME_BUDGET"
WATCHDOG_ENV = "AUTORESEARCH_WATCHDOG_S"
VERDICT_ENV = "AUTORESEARCH_VERDICT"
ALLOW_CPU_ENV = "AUTORESEARCH_ALLOW_CPU"
CPU_FAST_PATH_ENV = "AUTORESEARCH_CPU_FAST_PATH"
LAUNCHER_ENV = "AUTORESEARCH_LAUNCHER"
# set by the slurm launcher for the job itself: launch.py runs there locally, its output going to
# the job's output file, which the launch.py that submitted the job copies into run.log
SLURM_JOB_ENV = "AUTORESEARCH_SLURM_JOB"
SLURM_PARTITION_ENV = "AUTORESEARCH_SLURM_PARTITION"
SLURM_GRES_ENV = "AUTORESEARCH_SLURM_GRES"
SLURM_ARGS_ENV = "AUTORESEARCH_SLURM_ARGS"
SLURM_PENDING_ENV = "AUTORESEARCH_SLURM_PENDING_S"
WORKER_ENV = "AUTORESEARCH_WORKER"          # the worker of a night with several (gpu0, w1, ...)
# ... and the file its supervisor holds locked while it lives (in the store's .lives/): its idea
# claims live as long
WORKER_LIFE_ENV = "AUTORESEARCH_WORKER_LIFE"
WORKER_INDEX_ENV = "AUTORESEARCH_WORKER_INDEX"  # set for the agent's commands, read by none of ours
# the worker's baseline SEED, read by program.md's shell
WORKER_SEED_ENV = "AUTORESEARCH_WORKER_SEED"
# marks every process of a night (read from /proc by the night)
NIGHT_ENV = "AUTORESEARCH_NIGHT"
# the agent and model of the night's session the process is part of ("codex gpt-5-codex",
# "claude claude-opus-4-1", "api claude-sonnet-4-5"): set by the night for the agent's and the
# harness's commands, recorded in each ledger row analyze.py writes; a label, not a credential
AGENT_ENV = "AUTORESEARCH_AGENT"
# set by a boxed night for its agent: launch.py asks the night's runner, outside the agent's box,
# to train (night/runs.py), through this Unix socket
RUN_SOCKET_ENV = "AUTORESEARCH_RUN_SOCKET"
# set by that runner for the launch.py it runs: train.py trains in a box of its own, with the
# agent's variables (a JSON object: SEED, the agent's own) on top of the night's
TRAIN_BOX_ENV = "AUTORESEARCH_TRAIN_BOX"
TRAIN_VARIABLES_ENV = "AUTORESEARCH_TRAIN_VARIABLES"
# set by a test that analyses runs written by tests/synthetic.py: their seals say so, and
# analyze.py takes them only with this set (they never trained, so they are invalid everywhere else)
ACCEPT_SYNTHETIC_ENV = "AUTORESEARCH_ACCEPT_SYNTHETIC"

DEFAULT_CACHE = Path.home() / ".cache" / "autoresearch"
# climbmix-400b-shuffle: the public parquet layout autoresearch uses
DEFAULT_DATA_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
# analysis/verdict.py defines each; the human picks one a night
POLICY_NAMES = ("paired", "validated", "gain")  # the first is the default
LAUNCHERS = ("local", "slurm")
DEFAULT_GRES = "gpu:1"
# a job still pending this long is cancelled: within the tool timeout
DEFAULT_SLURM_PENDING_S = 600.0
MAIN_WORKER = "main"              # the worker of a night with one agent, or of commands run by hand
BASELINE_SEED = 42                # train.py's default SEED: worker K runs its baseline under 42 + K

# ---------------------------------------------------------------------------
# The limits of one run, in one order: the harness's watchdog ends a hung run (and records it as
# `timeout`) before anything outside kills it, and the agent's tool waits for both
# ---------------------------------------------------------------------------

WATCHDOG_BUDGET_FACTOR = 2.0  # a run is hung once it has used twice its budget ...
WATCHDOG_GRACE_S = 600        # ... plus ten minutes for startup, compilation and evaluation
# the night kills a run this long after its watchdog (measured from the process's start, a few
# seconds of imports before the watchdog's)
KILL_MARGIN_S = 120
SLURM_MARGIN_S = 120          # Slurm's --time: the watchdog plus this, the scheduler's outer bound
TOOL_MARGIN_S = 600           # the agent's shell-command timeout: the kill plus time to analyse
TIMEOUT_EXIT_CODE = 124       # as timeout(1)


def watchdog_s(time_budget: float) -> float:
    """Wall seconds from train.py's start after which its watchdog ends it as hung."""
    return time_budget * WATCHDOG_BUDGET_FACTOR + WATCHDOG_GRACE_S


def run_limits(watchdog: float) -> dict:
    """Every wall-clock limit of one run, from its watchdog's, in increasing order."""
    kill = watchdog + KILL_MARGIN_S
    return {"watchdog_s": watchdog, "slurm_s": watchdog + SLURM_MARGIN_S, "kill_s": kill,
            "tool_s": kill + TOOL_MARGIN_S}


# ---------------------------------------------------------------------------
# Reading the environment
# ---------------------------------------------------------------------------

def _refuse(name: str, raw: str, what: str):
    raise SystemExit(f"error: {name}={raw!r} is not {what}")


def _text(name: str, default, what: str = "", empty_ok: bool = False):
    """$name as it is set; `default` when it is unset. Set but empty is refused unless
    `empty_ok`."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    if not raw and not empty_ok:
        _refuse(name, raw, what)
    return raw


def _seconds(name: str, default: float) -> float:
    """$name as a positive, finite number of seconds; `default` when it is unset."""
    raw = _text(name, None, empty_ok=True)
    if raw is None:
        return float(default)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        _refuse(name, raw, "a positive number of seconds")
    return value


def _choice(name: str, choices: tuple, what: str, unset="first"):
    """$name, one of `choices`; when it is unset, `unset` (by default the first of them)."""
    raw = _text(name, choices[0] if unset == "first" else unset, empty_ok=True)
    if raw is not unset and raw not in choices:
        _refuse(name, raw, f"{what}; use one of {', '.join(choices)} (default {choices[0]})")
    return raw


def _name(name: str):
    """A file name (no folder), or None where unset."""
    raw = _text(name, None, empty_ok=True)
    if raw and not re.fullmatch(r"[\w.-]+", raw):
        _refuse(name, raw, "a file name")
    return raw or None


def _variables(name: str) -> dict:
    """A JSON object of variable names and values; {} where unset."""
    raw = _text(name, None, empty_ok=True)
    try:
        found = json.loads(raw) if raw else {}
    except ValueError:
        found = None
    if not isinstance(found, dict) or not all(isinstance(v, str) for v in found.values()):
        _refuse(name, raw, "a JSON object of variables")
    return found


CACHE_DIR = Path(_text(CACHE_ENV, DEFAULT_CACHE, "a folder"))
DATA_URL = _text(DATA_URL_ENV, DEFAULT_DATA_URL, "a URL")
TIME_BUDGET = _seconds(TIME_BUDGET_ENV, DEFAULT_TIME_BUDGET_S)
WATCHDOG_S = _seconds(WATCHDOG_ENV, watchdog_s(TIME_BUDGET))
LIMITS = run_limits(WATCHDOG_S)
VERDICT = _choice(VERDICT_ENV, POLICY_NAMES, "a verdict mode", unset=None)  # None: not chosen
ALLOW_CPU = _choice(ALLOW_CPU_ENV, ("0", "1"), "a switch") == "1"
CPU_FAST_PATH = _choice(CPU_FAST_PATH_ENV, ("0", "1"), "a switch") == "1"
LAUNCHER = _choice(LAUNCHER_ENV, LAUNCHERS, "a launcher")
IN_SLURM_JOB = _choice(SLURM_JOB_ENV, ("0", "1"), "a switch") == "1"
SLURM = {"partition": _text(SLURM_PARTITION_ENV, None, "a partition"),
         "gres": _text(SLURM_GRES_ENV, DEFAULT_GRES, empty_ok=True),  # empty: no --gres at all
         "extra": _text(SLURM_ARGS_ENV, None, empty_ok=True) or None,
         "pending_s": _seconds(SLURM_PENDING_ENV, DEFAULT_SLURM_PENDING_S)}
WORKER = _text(WORKER_ENV, MAIN_WORKER, empty_ok=True) or MAIN_WORKER
WORKER_LIFE = _name(WORKER_LIFE_ENV)
RUN_SOCKET = _text(RUN_SOCKET_ENV, None, empty_ok=True) or None
NIGHT = _text(NIGHT_ENV, None, empty_ok=True) or None  # the night this process is part of
AGENT = _text(AGENT_ENV, None, empty_ok=True) or None  # its session's agent and model, or None
TRAIN_BOX = _choice(TRAIN_BOX_ENV, ("0", "1"), "a switch") == "1"
TRAIN_VARIABLES = _variables(TRAIN_VARIABLES_ENV)
ACCEPT_SYNTHETIC = _choice(ACCEPT_SYNTHETIC_ENV, ("0", "1"), "a switch") == "1"
