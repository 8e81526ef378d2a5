"""
What bench_analyze.py and bench_report.py share: their command line (--runs, --repeats, --out),
one timed `python ...` process, and the result: its envelope (which benchmark, when, on what
machine and Python), its timings and its writer.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_RUNS = 500    # the store's size in the issues' targets: a long night and more
DEFAULT_REPEATS = 5   # timed repetitions: enough for a median and a max on a shared machine


def parse_args(doc: str, default_runs=DEFAULT_RUNS) -> argparse.Namespace:
    """--runs, --repeats and --out; the description is the first paragraph of doc. A tuple of
    default runs makes --runs a list of store sizes (one or more)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if isinstance(default_runs, tuple):
        parser.add_argument("--runs", type=int, nargs="+", default=list(default_runs))
    else:
        parser.add_argument("--runs", type=int, default=default_runs)
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    parser.add_argument("--out", type=Path)
    return parser.parse_args()


def timed_run(args: list, cwd: Path):
    """`python *args` in cwd, timed whole (interpreter start and imports included): (seconds,
    the finished process). Exits with its stderr when it fails."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    return seconds, proc


def envelope(script: str) -> dict:
    """The first keys of a result: which benchmark ran, when, on what machine and Python."""
    return {"benchmark": f"bench/{Path(script).name}", "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
            "python": platform.python_version()}


def timings(times: list) -> dict:
    """Every repetition's seconds, their median and their max."""
    return {"seconds": times, "median_s": statistics.median(times), "max_s": max(times)}


def write_result(result: dict, out):
    """The result as indented JSON in `out`; nothing when out is None (no --out)."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
