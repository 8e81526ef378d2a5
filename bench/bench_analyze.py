"""
How long `uv run analyze.py` takes on one run with a history of 500 archived runs, plots included
(issue: <= 3 s on the 2-core CPU machine).

The history is written straight into a store in a temporary git repository (500 ledger rows and
archive folders; the best and the previous run carry full metrics, the only archives analyze.py
reads). The analysed run is a synthetic 5-minute GPU run in train.py's format: 1,000 steps, per-layer
statistics for a depth-8 model every 50 steps, 10 validation points. Each repetition times the whole
`python analyze.py` process (interpreter start and imports included) on a fresh run, integrity checks
included: the runs are on a temporary prepare cache whose validation file is as large as a real one,
so the tokenizer and validation hashes cost what they cost on the real data.

Usage: uv run bench/bench_analyze.py [--runs 500] [--repeats 5] [--out bench/results/NAME.json]
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


import synthetic  # noqa: E402
from bench_common import envelope, parse_args, timed_run, timings, write_result  # noqa: E402
from harness import contract, settings  # noqa: E402
from analysis.store import Store  # noqa: E402

STEPS = 1000            # about what a 5-minute H100 run of the default train.py does
DEPTH = 8               # the default DEPTH: 2 + 8 * 6 parameter matrices in the per-layer stats
VAL_BYTES = 100 << 20   # the validation data analyze.py re-hashes on every run: about one climbmix parquet shard


def git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def build_cache(cache: Path):
    """A prepare cache: tokenizer files and a VAL_BYTES validation file, with the manifest prepare.py writes."""
    files = {"tokenizer/tokenizer.pkl": os.urandom(150_000), "tokenizer/token_bytes.npy": os.urandom(65_664),
             "data/climbmix/shard_06542.parquet": os.urandom(VAL_BYTES)}
    for rel, data in files.items():
        (cache / rel).parent.mkdir(parents=True, exist_ok=True)
        (cache / rel).write_bytes(data)
    manifest = {"source": "climbmix", "smoke_test": False, "vocab_size": 8192,
                "tokenizer_sha256": contract.sha256_file(cache / "tokenizer/tokenizer.pkl"),
                "token_bytes_sha256": contract.sha256_file(cache / "tokenizer/token_bytes.npy"), "train_files": [],
                "val_files": [{"path": "data/climbmix/shard_06542.parquet", "bytes": VAL_BYTES,
                               "sha256": contract.sha256_file(cache / "data/climbmix/shard_06542.parquet")}]}
    manifest["manifest_hash"] = contract.manifest_hash(manifest)
    (cache / "manifest.json").write_text(json.dumps(manifest, indent=2))


def build_history(repo: Path, n_runs: int, commit: str):
    store = Store(repo)
    ledger = []
    full = synthetic.make_records(n_steps=STEPS, depth=DEPTH, seed=1)
    for i in range(n_runs):
        run_id = f"{i:07x}"
        kept = i % 10 == 0
        value = 1.0 - 0.0001 * i if kept else 1.0 + 0.001 * (i % 7)
        summary = synthetic.make_summary(full, value, commit=commit, train_sha256=f"{i:064x}", seed=42 + i % 3)
        record = {**summary, "run_id": run_id, "status": "keep" if kept else "discard", "train_status": "ok",
                  "description": f"experiment {i}: a change to the model", "verdict": "keep" if kept else "discard"}
        folder = store.run_path(run_id)
        folder.mkdir(parents=True)
        (folder / "run_summary.json").write_text(json.dumps(summary))
        shutil.copy(repo / "train.py", folder / "train.py")
        if i >= n_runs - 10:  # the best and the previous run: full metrics
            synthetic.write_run(folder, full, summary, "log\n")
        ledger.append(record)
    store.write_ledger(ledger)


def main():
    args = parse_args(__doc__)

    repo = Path(tempfile.mkdtemp(prefix="alr-bench-analyze-"))
    cache = Path(tempfile.mkdtemp(prefix="alr-bench-cache-"))
    build_cache(cache)
    os.environ["AUTORESEARCH_CACHE"] = str(cache)  # for the analyze.py processes
    os.environ[settings.ACCEPT_SYNTHETIC_ENV] = "1"  # whose runs are synthetic ones, sealed as such
    settings.CACHE_DIR = cache  # for the summaries written here (this process read its settings at import)
    synthetic.copy_harness(repo)
    (repo / ".gitignore").write_text(".auto-log-research/\nrun.log\nmetrics.jsonl\nrun_summary.json\n__pycache__/\n")
    git("init", "-q", cwd=repo)
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "bench"], cwd=repo, check=True, env=env)
    t0 = time.perf_counter()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, check=True, capture_output=True,
                            text=True).stdout.strip()
    build_history(repo, args.runs, commit)  # the first run's commit is the harness every later run is checked against
    print(f"history of {args.runs} runs written in {time.perf_counter() - t0:.1f} s")

    times = []
    for k in range(args.repeats):
        records = synthetic.make_records(n_steps=STEPS, depth=DEPTH, seed=100 + k)
        summary = synthetic.make_summary(records, 0.99 + 0.001 * k, commit="f00dcafe"[:7], seed=k,
                                         train_sha256=f"{10_000 + k:064x}",
                                         started_at=f"2026-11-22T00:00:{k:02d}+0000")
        synthetic.write_run(repo, records, summary, f"bench run {k}\n")
        seconds, proc = timed_run(["analyze.py"], repo)
        times.append(seconds)
        if "INVALID" in proc.stdout:
            sys.exit(f"the benchmark run was judged invalid, so it did not time a normal analysis:\n{proc.stdout}")
        print(f"repeat {k + 1}: {times[-1]:.2f} s")
    ledger_rows = len(Store(repo).read_ledger())
    result = {
        **envelope(__file__), "history_runs": args.runs, "steps": STEPS, "depth": DEPTH,
        "val_bytes_hashed": VAL_BYTES, "ledger_rows_after": ledger_rows, **timings(times),
        "last_stdout": proc.stdout.strip().splitlines(),
    }
    print(f"median {result['median_s']:.2f} s, max {result['max_s']:.2f} s over {args.repeats} runs "
          f"with {args.runs} archived")
    write_result(result, args.out)
    shutil.rmtree(repo)
    shutil.rmtree(cache)


if __name__ == "__main__":
    main()
