"""
train.py variants for the benchmarks, and one measured run of a variant, shared by bench_train.py
and gpu_check.py so that both report the same figures computed the same way. Standard library only
(harness/settings.py is too): it runs before any wheel is installed on a bare GPU machine.
"""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from harness import settings  # noqa: E402  (standard library only, like this file)

HARNESS = ("train.py", "prepare.py", "launch.py", "harness")  # the agent's file, the harness

# Instrumentation off: one metrics line, the last (the summary's steps and clock come from it),
# per-layer stats never fire, no curve points.
UNINSTRUMENTED = {
    "LAYER_STATS_EVERY = 50 ": "LAYER_STATS_EVERY = 10**9 ",
    "    LAYER_STATS_EVERY = 10\n": "    LAYER_STATS_EVERY = 10**9\n",
    "    if progress >= next_val or done:": "    if False:",
    "    run.log_step(record)\n": "    if done:\n        run.log_step(record)\n",
}
# Every layer through SDPA (dense boolean masks for the sliding windows) instead of flex_attention.
SDPA_ATTENTION = {'ATTENTION_BACKEND = "flex" if FAST_PATH else "sdpa"':
                  'ATTENTION_BACKEND = "sdpa"'}
VARIANTS = {"instrumented": {}, "uninstrumented": UNINSTRUMENTED, "sdpa": SDPA_ATTENTION}
# Small changes of train.py for measuring seed pairing (bench_pairing.py, gpu_check.py's pairing),
# each one line. The width change alters the initialisation's shapes, so its seed's draws no longer
# line up with the baseline's.
SMALL_CHANGES = {"matrix_lr_x1.1": {"MATRIX_LR = 0.04 ": "MATRIX_LR = 0.044 "},
                 "width_96": {"ASPECT_RATIO = 64 ": "ASPECT_RATIO = 96 "}}

STDOUT_TAIL_CHARS = 2000  # a failed run's last progress lines
STDERR_TAIL_CHARS = 4000  # a failed run's traceback: its last frames and the error line


class RunFailed(Exception):
    """A train.py run that exited badly or was killed at its deadline: the message says which,
    stdout_tail and stderr_tail hold the ends of its output."""

    def __init__(self, why: str, stdout_tail: str = "", stderr_tail: str = ""):
        super().__init__(why)
        self.stdout_tail, self.stderr_tail = stdout_tail, stderr_tail


def copy(src: Path, dest: Path):
    """A file, or a folder without its bytecode."""
    if src.is_dir():
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"),
                        dirs_exist_ok=True)
    else:
        shutil.copy(src, dest)


def write_variant(dest: Path, name: str, edits: dict = None, owner: str = None) -> Path:
    """The harness files in dest, with train.py edited into the named variant, then by `edits`
    (old text: new text), whose stale text names `owner` as the script to update."""
    source = (ROOT / "train.py").read_text()
    for old, new in [*VARIANTS[name].items(), *(edits or {}).items()]:
        if old not in source:
            script = owner or "bench/train_variants.py"
            raise SystemExit(f"error: benchmark variant {name!r} is stale: {old!r} is not in "
                             f"train.py; update {script}")
        source = source.replace(old, new)
    dest.mkdir(parents=True, exist_ok=True)
    for part in HARNESS[1:]:
        copy(ROOT / part, dest / part)
    (dest / "train.py").write_text(source)
    return dest


def tail(path: Path, chars: int) -> str:
    return path.read_text(errors="replace")[-chars:]


def run_to_end(cwd: Path, env: dict, logs: Path, timeout) -> int:
    """`python launch.py` (train.py beside the evaluator) in cwd, its output in logs/; its exit
    status. Past `timeout` seconds (None: no limit) its whole process group is killed and RunFailed
    raised; an interrupt of this process kills it too, so that no training is left running on the
    device."""
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "launch.py"], cwd=cwd, env=env, stdout=out,
                                stderr=err, start_new_session=True)
        try:
            code = proc.wait(timeout=None if timeout is None else max(timeout, 0))
        except subprocess.TimeoutExpired:
            code = None  # past its time: killed below, reported as such
        finally:
            if proc.poll() is None:  # past its time, or this process was interrupted
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if code is None:
        raise RunFailed(f"train.py still running after {timeout:.0f} s: killed at the deadline",
                        tail(logs / "stdout", STDOUT_TAIL_CHARS),
                        tail(logs / "stderr", STDERR_TAIL_CHARS))
    return code


def run_train(src_dir: Path, budget: float, env: dict = None, timeout: float = None):
    """One train.py run from a copy of src_dir under a training budget of `budget` seconds:
    (figures, summary). Raises RunFailed when it exits badly or runs past `timeout` seconds."""
    with tempfile.TemporaryDirectory() as d:
        work, logs = Path(d) / "run", Path(d)
        work.mkdir()
        for name in HARNESS:
            copy(src_dir / name, work / name)
        env = {**os.environ, **(env or {}), settings.TIME_BUDGET_ENV: str(budget)}
        started = time.monotonic()
        code = run_to_end(work, env, logs, timeout)
        wall = time.monotonic() - started
        if code != 0:
            raise RunFailed(f"train.py failed (exit {code})",
                            tail(logs / "stdout", STDOUT_TAIL_CHARS),
                            tail(logs / "stderr", STDERR_TAIL_CHARS))
        summary = json.loads((work / "run_summary.json").read_text())
        steps = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    return {**figures(summary, steps), "wall_seconds": wall}, summary


def figures(summary: dict, steps: list) -> dict:
    """Speed, memory, overhead and compilation figures of one run, from its summary and its metrics
    lines: every step's, or only the last one's (the uninstrumented variant)."""
    config = summary["config"]
    warm = config["CLOCK_WARMUP_STEPS"]
    timed = summary["num_steps"] - warm
    step_ms = [s["perf/step_time_ms"] for s in steps if s["step"] >= warm]  # the clocked steps
    compiled = summary.get("compile") or {}
    return {
        "device": summary["device"], "torch": summary["torch_version"],
        "num_steps": summary["num_steps"], "training_seconds": summary["training_seconds"],
        "steps_per_s": timed / summary["training_seconds"],
        "tokens_per_s": timed * config["TOTAL_BATCH_SIZE"] / summary["training_seconds"],
        "mfu_percent": summary["mfu_percent"],
        "median_step_ms": statistics.median(step_ms) if step_ms else None,
        "step_times_logged": len(step_ms),
        "peak_vram_mb": summary["peak_vram_mb"], "startup_seconds": summary["startup_seconds"],
        "overhead_seconds": summary["total_seconds"] - summary["training_seconds"],
        "val_points": sum("val/bpb" in s for s in steps), "val_bpb": summary["val_bpb"],
        "graph_breaks": compiled.get("graph_breaks"), "recompiles": compiled.get("recompiles"),
        "graphs_in_loop": compiled.get("graphs_in_loop"),
        "recompiles_in_loop": compiled.get("recompiles_in_loop"),
        "attention": config.get("ATTENTION_BACKEND"),
        "device_batch_size": config["DEVICE_BATCH_SIZE"],
        "evaluator_seconds": (summary.get("evaluator") or {}).get("seconds"),
        "evaluator_peak_memory_mb": (summary.get("evaluator") or {}).get("peak_memory_mb"),
    }
