"""
The whole GPU measurement of train.py on a bare GPU machine: only a Python with torch is needed
(no uv, no network).

1. Installs the wheels it is given (--wheels DIR: rustbpe and whatever else the machine lacks) into
   a private folder, without pip or the network.
2. Prepares the offline smoke-test corpus into --cache (or uses the prepared cache found there).
3. Runs train.py's default configuration for the full budget, then the same file with the
   instrumentation switched off (and any other --variants, e.g. sdpa attention), one after another.
4. Prints one JSON line per run (device, torch, MFU, tokens/s, steps, median step time, peak VRAM,
   startup, total - training seconds, val_bpb, graph breaks, recompiles) and a summary line with the
   instrumentation's cost and each target met or not. --out also writes the lines to a file.

Usage:
    python3 bench/gpu_check.py --wheels .whl --out bench/results/gpu-check.jsonl
    python3 bench/gpu_check.py --variants uninstrumented --budget 300   # one variant per call
Standard library only, so it runs before anything is installed.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_variants import ROOT, VARIANTS, run_train, write_variant  # noqa: E402

# The targets for a 5-minute H100 run (BENCHMARKS.md)
TARGET_MFU_PERCENT = 40.0          # autoresearch publishes 39.8 % with FlashAttention-3
TARGET_INSTRUMENTATION_PERCENT = 1.0
TARGET_OVERHEAD_S = 20.0           # total - training seconds, compilation included
TARGET_PEAK_VRAM_MB = 80 * 1024    # the default DEVICE_BATCH_SIZE must fit an 80 GB card


def install_wheels(wheel_dir: Path, target: Path) -> dict:
    """Unpack every wheel in wheel_dir into target (what `pip install --target` does for a wheel, without
    pip or the network); returns the environment under which train.py sees them."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"error: no .whl files in {wheel_dir}")
    target.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)
    for lib in [*target.glob("*.data/purelib"), *target.glob("*.data/platlib")]:  # a wheel's relocated libraries
        for item in lib.iterdir():
            shutil.move(str(item), target / item.name)
    print(f"installed {len(wheels)} wheel(s) into {target}", file=sys.stderr)
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p)}


def prepare_cache(cache: Path, env: dict):
    if (cache / "manifest.json").exists():
        print(f"using the prepared cache in {cache}", file=sys.stderr)
        return
    subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--offline"], check=True,
                   env={**os.environ, **env, "AUTORESEARCH_CACHE": str(cache)})


def summarise(runs: dict) -> dict:
    """The instrumentation's cost (when both variants ran) and each target, met or not."""
    out = {"summary": True}
    base = runs.get("instrumented")
    if base and "uninstrumented" in runs:
        out["instrumentation_cost_percent"] = 100 * (runs["uninstrumented"]["steps_per_s"] / base["steps_per_s"] - 1)
    for name, run in runs.items():
        if name != "instrumented":
            out[f"{name}_vs_instrumented_steps_per_s"] = run["steps_per_s"] / base["steps_per_s"] if base else None
    if base:
        out["targets"] = {
            f"mfu >= {TARGET_MFU_PERCENT:g} %": base["mfu_percent"] >= TARGET_MFU_PERCENT,
            f"overhead <= {TARGET_OVERHEAD_S:g} s": base["overhead_seconds"] <= TARGET_OVERHEAD_S,
            "peak VRAM <= 80 GB": base["peak_vram_mb"] <= TARGET_PEAK_VRAM_MB,
            "no graph break, nothing compiled on the clock": (base["graph_breaks"], base["graphs_in_loop"],
                                                              base["recompiles_in_loop"]) == (0, 0, 0),
        }
        if "instrumentation_cost_percent" in out:
            out["targets"][f"instrumentation <= {TARGET_INSTRUMENTATION_PERCENT:g} %"] = (
                out["instrumentation_cost_percent"] <= TARGET_INSTRUMENTATION_PERCENT)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--wheels", type=Path, help="folder of .whl files to install first (offline)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "alr-gpu-check-cache",
                        help="prepare cache: reused when it holds a manifest, else the offline corpus is prepared")
    parser.add_argument("--budget", type=float, default=300, help="training seconds per run (default 300)")
    parser.add_argument("--variants", default="instrumented,uninstrumented",
                        help=f"comma-separated, run in this order; of {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, help="also write the JSON lines to this file")
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    env = install_wheels(args.wheels, Path(tempfile.mkdtemp(prefix="alr-site-"))) if args.wheels else {}
    prepare_cache(args.cache, env)
    env["AUTORESEARCH_CACHE"] = str(args.cache)
    lines, runs = [], {}
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            folder = Path(d) / name
            folder.mkdir()
            run, _ = run_train(write_variant(folder, name), args.budget, env)
            runs[name] = run
            lines.append({"variant": name, "date": time.strftime("%Y-%m-%d"), "budget_s": args.budget,
                          "host": platform.node(), **run})
            print(json.dumps(lines[-1]), flush=True)
    lines.append(summarise(runs))
    print(json.dumps(lines[-1]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(line) + "\n" for line in lines))


if __name__ == "__main__":
    main()
