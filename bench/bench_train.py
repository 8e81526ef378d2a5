"""
Benchmark train.py's speed and the cost of its instrumentation.

Two measurements, written as JSON to stdout (commit it under bench/results/):
1. components: the per-step cost of each piece of instrumentation, timed in-process on the model
   train.py builds on this device (metrics line, per-layer statistics), next to the step time.
2. end_to_end: whole `train.py` runs, alternating the real file with a copy whose instrumentation
   is switched off (no per-step metrics lines, no per-layer statistics, no validation curve):
   steps/s, tokens/s, MFU, step time and per-run overhead (total_seconds - training_seconds).

Usage: uv run bench/bench_train.py [--budget 60] [--repeats 3] > bench/results/<device>-<date>.json
Needs a prepared cache (uv run prepare.py).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from harness import contract, data, device, runlog, settings  # noqa: E402

from train_defs import load_train_definitions  # noqa: E402
from train_variants import RunFailed, run_train, write_variant  # noqa: E402


def timeit(fn, n):
    fn()  # warm up
    device.synchronize(DEVICE)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    device.synchronize(DEVICE)
    return (time.perf_counter() - t0) / n


def components(c: dict, vocab_size: int):
    """Per-step cost of the metrics line and the per-layer statistics on train.py's own model.

    `c` is the `config` of a real run's summary: the constants in effect on this device (the CPU
    configuration included), so the model here is the one train.py trained."""
    defs = load_train_definitions()
    depth, head_dim, batch, seq = c["DEPTH"], c["HEAD_DIM"], c["DEVICE_BATCH_SIZE"], c["SEQ_LEN"]
    every = c["LAYER_STATS_EVERY"]
    dim = -(-depth * c["ASPECT_RATIO"] // head_dim) * head_dim
    config = defs["GPTConfig"](sequence_len=max(seq, settings.MAX_SEQ_LEN), vocab_size=vocab_size,
                               n_layer=depth, n_head=dim // head_dim, n_embd=dim, window_pattern=c["WINDOW_PATTERN"],
                               short_window=c["SHORT_WINDOW"], softcap=c["LOGIT_SOFTCAP"],
                               ve_gate_channels=c["VE_GATE_CHANNELS"], attention="sdpa",
                               dtype=torch.bfloat16 if DEVICE.type == "cuda" else torch.float32)
    model = defs["GPT"](config).to(DEVICE)
    model.init_weights()
    model.prepare_attention([seq])
    optimizer = defs["build_optimizer"](model, dim)
    x = torch.randint(0, vocab_size, (batch, seq), device=DEVICE)
    cpu = DEVICE.type != "cuda"
    autocast = torch.amp.autocast("cuda", dtype=torch.bfloat16) if not cpu else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss = model(x, x)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss.detach().item()

    step_s = timeit(step, 5 if cpu else 20)
    stats = runlog.LayerStats(model)
    with autocast:
        model(x, x).backward()

    def layer_stats():
        stats.before_step()
        return stats.after_step()

    layer_stats_s = timeit(layer_stats, 20)
    stamped = {*contract.HARNESS_STEP_KEYS, *contract.DERIVED_STEP_KEYS}
    record = {k: 1.0 for k in contract.REQUIRED_STEP_KEYS if k not in stamped} | {contract.STEP: 1}
    with tempfile.TemporaryDirectory() as d:
        logger = RunNoHooks(d)
        logger.start_clock(model, tokens_per_step=batch * seq, flops_per_token=model.num_flops_per_token(seq))
        log_s = timeit(lambda: logger.log_step(record), 2000)
        log_stats_s = timeit(lambda: logger.log_step(record | layer_stats()), 20) - layer_stats_s
    per_step = log_s + (layer_stats_s + log_stats_s) / every
    return {"step_ms": step_s * 1e3, "metrics_line_us": log_s * 1e6, "layer_stats_ms": layer_stats_s * 1e3,
            "layer_stats_every": every, "layer_stats_line_us": log_stats_s * 1e6,
            "instrumentation_per_step_ms": per_step * 1e3,
            "instrumentation_overhead_percent": 100 * per_step / step_s,
            "config": {"depth": depth, "dim": dim, "batch": batch, "seq_len": seq}}


class RunNoHooks(runlog.Run):
    """The harness's real record of a run, minus the process-wide excepthook and its watchdog."""

    def __init__(self, run_dir):
        hook = sys.excepthook
        super().__init__({}, run_dir=run_dir)
        sys.excepthook = hook
        self.watchdog.stop()


def end_to_end(budget, repeats):
    with tempfile.TemporaryDirectory() as d:
        plain = write_variant(Path(d), "uninstrumented")
        runs = {"instrumented": [], "uninstrumented": []}
        for _ in range(repeats):  # alternate so drift in machine speed hits both alike
            run, summary = run_train(ROOT, budget)
            runs["instrumented"].append(run)
            runs["uninstrumented"].append(run_train(plain, budget)[0])
    med = {k: statistics.median(r["steps_per_s"] for r in v) for k, v in runs.items()}
    return {"budget_s": budget, "runs": runs, "median_steps_per_s": med,
            "instrumentation_slowdown_percent": 100 * (med["uninstrumented"] / med["instrumented"] - 1)}, summary["config"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--budget", type=float, default=60, help="training seconds per end-to-end run")
    parser.add_argument("--repeats", type=int, default=3, help="end-to-end runs per variant")
    args = parser.parse_args()
    DEVICE = device.autodetect_device()
    manifest = data.load_manifest()
    try:
        e2e, run_config = end_to_end(args.budget, args.repeats)
    except RunFailed as e:
        sys.exit(f"error: {e}\n{e.stdout_tail}\n{e.stderr_tail}")
    result = {
        "date": time.strftime("%Y-%m-%d"), "device": device.device_description(DEVICE),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "data": data.data_label(manifest),
        "components": components(run_config, manifest["vocab_size"]),
        "end_to_end": e2e,
    }
    print(json.dumps(result, indent=2))
