"""
How long `uv run analyze.py report` takes on stores of 500, 2,000 and 10,000 runs, and how large
report.html is (issue 21: the page of the last night <= 3 s and <= 5 MB at every size, on the
2-core CPU machine; issue 12 asked <= 3 s at 500 runs).

The store is written straight into a temporary git repository, as bench/bench_analyze.py does: ledger
rows and archive folders, every 10th run kept, every 25th a crash (3 causes), the kept runs with full
metrics (1,000 steps of a depth-8 model, 10 validation points), every run with an analysis.md (a real
one, written by analyze.py for a synthetic run, with a note from the agent on every 5th), a diff.patch
and the 7 figures' files (their size does not matter: the page links them). Each repetition times the
whole `python analyze.py report` process, interpreter start and imports included. The runs are
spread over nights of RUNS_PER_NIGHT (each row records its night and its session's agent, as
analyze.py in a supervised night does; a night starts a day after the previous one): the page shows
the last in full.

Usage: uv run bench/bench_report.py [--runs 500 2000 10000] [--repeats 5]
                                    [--out bench/results/NAME.json]
"""

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import synthetic  # noqa: E402
from bench_common import envelope, parse_args, timed_run, timings, write_result  # noqa: E402
from analysis import html_report  # noqa: E402
from analysis.store import REPORT_HTML, Store  # noqa: E402
from harness import settings  # noqa: E402

STEPS = 1000            # about what a 5-minute H100 run of the default train.py does
DEPTH = 8               # the default DEPTH
KEEP_EVERY = 10         # every 10th run kept (a good night keeps fewer)
CRASH_EVERY = 25        # every 25th run a crash
# the agents and models of the nights' sessions, a night's runs alternating between two (the page
# names each night's and each run's)
AGENTS = ("codex gpt-5-codex", "claude claude-opus-4-1")
RUNS_PER_NIGHT = 100    # an 8-hour night of one GPU at about 5 minutes a run
RUN_EVERY_S = 300       # between two runs' starts within a night
NIGHT_EVERY_S = 86400   # between two nights' starts
SIZES = (500, 2000, 10000)  # the store's sizes of issue 21's target (a week of 8-GPU nights and more)
CAUSES = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {n}.00 GiB",
          "RuntimeError: shape '[8, 2048, 6, 128]' is invalid for input of size {n}",
          "NameError: name 'WARMUP_RATIO' is not defined")
DIFF = """# train.py of run {run} against the best {best}
--- a/train.py ({best})
+++ b/train.py ({run})
@@ -56,7 +56,7 @@
 TOTAL_BATCH_SIZE = 2**19   # tokens per optimizer step
-MATRIX_LR = 0.04           # Muon
+MATRIX_LR = 0.0{k}           # Muon
 EMBEDDING_LR = 0.6
"""


def git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
                        "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"})


def sample_analysis(tmp: Path) -> str:
    """A real analysis.md: analyze.py on a synthetic run of a repository of its own."""
    repo = tmp / "sample"
    repo.mkdir()
    synthetic.copy_harness(repo)
    git("init", "-q", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "sample", cwd=repo)
    records = synthetic.make_records(n_steps=STEPS, depth=DEPTH, seed=3)
    synthetic.write_run(repo, records, synthetic.make_summary(records, 1.0), "log\n")
    subprocess.run([sys.executable, "analyze.py"], cwd=repo, check=True, capture_output=True)
    run_id = Store(repo).read_ledger()[0]["run_id"]
    return (Store(repo).run_path(run_id) / "analysis.md").read_text()


def build_store(repo: Path, n_runs: int, analysis: str):
    store = Store(repo)
    ledger = []
    full = synthetic.make_records(n_steps=STEPS, depth=DEPTH, seed=1)
    metrics = "".join(json.dumps(r) + "\n" for r in full)
    figures = html_report.RUN_FIGURES[:-1]
    best = "0000000"
    t0 = time.time() - (n_runs // RUNS_PER_NIGHT + 1) * NIGHT_EVERY_S
    for i in range(n_runs):
        run_id = f"{i:07x}"
        kept, crashed = i % KEEP_EVERY == 0, i % CRASH_EVERY == CRASH_EVERY - 1
        value = 1.0 - 0.0001 * i if kept else 1.0 + 0.001 * (i % 7)
        night_start = t0 + (i // RUNS_PER_NIGHT) * NIGHT_EVERY_S
        start = night_start + (i % RUNS_PER_NIGHT) * RUN_EVERY_S
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(start))
        summary = synthetic.make_summary(full, value, commit=run_id, train_sha256=f"{i:064x}", seed=42 + i % 3,
                                         started_at=stamp)
        record = {**summary, "run_id": run_id, "status": "keep" if kept else "discard", "train_status": "ok",
                  "description": f"experiment {i}: a change to the model", "verdict": "keep" if kept else "discard",
                  "analyzed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(start + 290)),
                  "night": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(night_start)),
                  "agent": AGENTS[i % len(AGENTS)],
                  "delta_best": value - 1.0, "delta_sigma": (value - 1.0) / 0.0015, "p_value": 0.05, "n_pooled": 1}
        if crashed:
            record.update(status="crash", verdict="crash", val_bpb=None, train_status="crash",
                          error=CAUSES[i % 3].format(n=i % 4 + 1))
        folder = store.run_path(run_id)
        folder.mkdir(parents=True)
        note = f"\nChecked run {run_id} by hand: the loss was still falling at the end.\n" if i % 5 == 0 else ""
        (folder / "analysis.md").write_text(analysis.replace("# Run ", f"# Run {run_id} was ", 1) + note)
        (folder / "diff.patch").write_text(DIFF.format(run=run_id, best=best, k=i % 9 + 1))
        for name in figures:
            (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n")
        if kept:
            (folder / "metrics.jsonl").write_text(metrics)
            best = run_id
        ledger.append(record)
    store.write_ledger(ledger)
    (store.path("insights.md")).write_text("# Insights\n\n## Validated findings\n\n" +
                                          "".join(f"- finding {k}: a longer warmup helps\n" for k in range(40)))
    (store.path("ideas_queue.md")).write_text("# Ideas queue\n\n" + "".join(f"{k}. idea {k}\n" for k in range(1, 30)))


def measure(tmp: Path, n_runs: int, repeats: int, analysis: str) -> dict:
    """A store of n_runs in a repository of its own, its report written `repeats` times: the
    timings, the page's size and analyze.py's line."""
    repo = tmp / f"repo-{n_runs}"
    repo.mkdir()
    synthetic.copy_harness(repo)
    t0 = time.perf_counter()
    build_store(repo, n_runs, analysis)
    print(f"store of {n_runs} runs written in {time.perf_counter() - t0:.1f} s")
    times, cpu = [], []
    for k in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds, proc = timed_run(["analyze.py", "report"], repo)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append(seconds)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        print(f"  repeat {k + 1}: {times[-1]:.2f} s ({cpu[-1]:.2f} s of CPU)")
    size = Store(repo).path(REPORT_HTML).stat().st_size
    result = {"runs": n_runs, "nights": -(-n_runs // RUNS_PER_NIGHT),
              "kept": len(range(0, n_runs, KEEP_EVERY)), **timings(times),
              "cpu_seconds": cpu, "cpu_median_s": statistics.median(cpu), "report_bytes": size,
              "last_stdout": proc.stdout.strip()}
    print(f"  median {result['median_s']:.2f} s, max {result['max_s']:.2f} s over {repeats} "
          f"repeats; report.html {size / 1e6:.2f} MB for {n_runs} runs")
    shutil.rmtree(repo)
    return result


def main():
    args = parse_args(__doc__, default_runs=SIZES)
    tmp = Path(tempfile.mkdtemp(prefix="alr-bench-report-"))
    cache = tmp / "cache"
    cache.mkdir()
    os.environ["AUTORESEARCH_CACHE"] = str(cache)
    os.environ[settings.ACCEPT_SYNTHETIC_ENV] = "1"  # the store's runs are synthetic, sealed as such
    # as a normal installation runs it: bytecode cached after the first repeat (a Python told not to
    # write it compiles analysis/ on every call, about 0.3 s more)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    analysis = sample_analysis(tmp)
    sizes = [measure(tmp, n, args.repeats, analysis) for n in args.runs]
    write_result({**envelope(__file__), "runs_per_night": RUNS_PER_NIGHT,
                  "bytecode": "written by the first repeat, cached for the others",
                  "load_average_at_end": os.getloadavg(), "sizes": sizes}, args.out)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
