"""
train.py variants for the benchmarks, and one measured run of a variant, shared by bench_train.py and
gpu_check.py so that both report the same figures computed the same way. Standard library only: it
runs before any wheel is installed on a bare GPU machine.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ("train.py", "prepare.py", "harness")  # what a run needs: the agent's file and the harness

# Instrumentation off: one metrics line, the last (the summary's steps and clock come from it),
# per-layer stats never fire, no curve points.
UNINSTRUMENTED = {
    "LAYER_STATS_EVERY = 50 ": "LAYER_STATS_EVERY = 10**9 ",
    "    LAYER_STATS_EVERY = 10\n": "    LAYER_STATS_EVERY = 10**9\n",
    "    if progress >= next_val or done:": "    if False:",
    "    run.log_step(record)\n": "    if done:\n        run.log_step(record)\n",
}
# Every layer through SDPA (dense boolean masks for the sliding windows) instead of flex_attention.
SDPA_ATTENTION = {'ATTENTION_BACKEND = "flex" if FAST_PATH else "sdpa"': 'ATTENTION_BACKEND = "sdpa"'}
VARIANTS = {"instrumented": {}, "uninstrumented": UNINSTRUMENTED, "sdpa": SDPA_ATTENTION}


def copy(src: Path, dest: Path):
    """A file, or a folder without its bytecode."""
    if src.is_dir():
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    else:
        shutil.copy(src, dest)


def write_variant(dest: Path, name: str) -> Path:
    """The harness files in dest, with train.py edited into the named variant."""
    source = (ROOT / "train.py").read_text()
    for old, new in VARIANTS[name].items():
        if old not in source:
            raise SystemExit(f"error: benchmark variant {name!r} is stale: {old!r} is not in train.py; update "
                             f"bench/train_variants.py")
        source = source.replace(old, new)
    for name in HARNESS[1:]:
        copy(ROOT / name, dest / name)
    (dest / "train.py").write_text(source)
    return dest


def run_train(src_dir: Path, budget: float, env: dict = None):
    """One train.py run from a copy of src_dir: (figures, summary). Exits with train.py's stderr on failure."""
    with tempfile.TemporaryDirectory() as d:
        for name in HARNESS:
            copy(src_dir / name, Path(d) / name)
        env = {**os.environ, **(env or {}), "AUTORESEARCH_TIME_BUDGET": str(budget)}
        proc = subprocess.run([sys.executable, "train.py"], cwd=d, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"train.py failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        summary = json.loads((Path(d) / "run_summary.json").read_text())
        steps = [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    return figures(summary, steps), summary


def figures(summary: dict, steps: list) -> dict:
    """Speed, memory, overhead and compilation figures of one run, from its summary and metrics."""
    config = summary["config"]
    warm = config["CLOCK_WARMUP_STEPS"]
    timed = summary["num_steps"] - warm
    step_ms = [s["perf/step_time_ms"] for s in steps[warm:]]
    compiled = summary.get("compile") or {}
    return {
        "device": summary["device"], "torch": summary["torch_version"],
        "num_steps": summary["num_steps"], "training_seconds": summary["training_seconds"],
        "steps_per_s": timed / summary["training_seconds"],
        "tokens_per_s": timed * config["TOTAL_BATCH_SIZE"] / summary["training_seconds"],
        "mfu_percent": summary["mfu_percent"], "median_step_ms": statistics.median(step_ms) if step_ms else None,
        "peak_vram_mb": summary["peak_vram_mb"], "startup_seconds": summary["startup_seconds"],
        "overhead_seconds": summary["total_seconds"] - summary["training_seconds"],
        "val_points": sum("val/bpb" in s for s in steps), "val_bpb": summary["val_bpb"],
        "graph_breaks": compiled.get("graph_breaks"), "recompiles": compiled.get("recompiles"),
        "graphs_in_loop": compiled.get("graphs_in_loop"), "recompiles_in_loop": compiled.get("recompiles_in_loop"),
        "attention": config.get("ATTENTION_BACKEND"), "device_batch_size": config["DEVICE_BATCH_SIZE"],
    }
