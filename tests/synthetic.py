"""
Synthetic training runs with known answers, written in the exact format train.py writes (harness/contract.py):
a planted power-law loss curve with noise, optional spikes and offsets, a validation curve,
per-layer statistics, run_summary.json and a run.log. Used by the analyze.py tests and its benchmark.

A synthetic run never trained, and its seal says so (contract.SEALED_BY_SYNTHETIC): analyze.py calls
it invalid unless the test accepts synthetic runs (the `accept_synthetic` fixture, which sets
AUTORESEARCH_ACCEPT_SYNTHETIC=1). Where it does, the run passes the other integrity checks like an
honest run would: its harness_hash is this repository's, its data is whatever the prepare cache
($AUTORESEARCH_CACHE) holds, and its training_seconds is the sum of its timed step times.
"""

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from harness import contract

ROOT = Path(__file__).resolve().parent.parent

BOOKKEEPING_S = 0.0005  # between a step's end and its metrics line, as in train.py
EVAL_S = 0.8            # one validation-curve point
LAYER_KINDS = ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.c_proj.weight",
               "mlp.c_fc.weight", "mlp.c_proj.weight")


HARNESS_COPY = ("analyze.py", "launch.py", "prepare.py", "train.py")  # what a repository of the loop holds
PACKAGES = ("harness", "analysis", "night")  # copied whole into every such repository


def copy_harness(dest, files=HARNESS_COPY):
    """Copy the project's `files` and its packages (harness/, analysis/, night/, without bytecode) into
    `dest`: a repository to test or benchmark the loop in, as a user's checkout would hold them."""
    dest = Path(dest)
    for name in files:
        shutil.copy(ROOT / name, dest / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"),
                        dirs_exist_ok=True)


def param_names(depth: int) -> list:
    return ["wte.weight", "lm_head.weight"] + [f"blocks.{i}.{k}" for i in range(depth) for k in LAYER_KINDS]


def make_records(n_steps=400, l_inf=3.0, a=6.0, alpha=0.5, noise=0.02, seed=0, step_ms=300.0,
                 tokens_per_step=524288, warmup_steps=2, val_every=0.1, layer_every=50, depth=4,
                 spikes=(), offset=None, grad_scale=None, norm_growth=None, budget_s=None):
    """Records of one run. spikes: [(step, height)] added to the raw loss; offset: (step, delta) added to
    the loss from that step on; grad_scale: {param name: factor} on its gradient norm;
    norm_growth: {param name: factor} its weight norm grows by, linearly over the run."""
    rng = np.random.default_rng(seed)
    steps = np.arange(n_steps)
    loss = l_inf + a * (steps + 1.0) ** -alpha + rng.normal(0, noise, n_steps)
    for step, height in spikes:
        loss[step] += height
    if offset:
        loss[offset[0]:] += offset[1]
    budget = budget_s or (n_steps - warmup_steps) * step_ms / 1000
    names = param_names(depth)
    grad_scale, norm_growth = grad_scale or {}, norm_growth or {}
    records, ema, t, next_val = [], 0.0, 0.0, val_every
    wall, evals = 20.0, 0.0  # the harness's clock stamps: startup, then each step plus its bookkeeping and evals
    for s in steps:
        dt = step_ms * (1 + 0.02 * rng.standard_normal())
        if s >= warmup_steps:
            t += dt / 1000
        wall += dt / 1000 + BOOKKEEPING_S
        progress = min(t / budget, 1.0)
        ema = 0.9 * ema + 0.1 * loss[s]
        rec = {contract.STEP: int(s), contract.TIME_S: t, contract.TRAIN_LOSS: float(loss[s]),
               contract.TRAIN_LOSS_SMOOTH: ema / (1 - 0.9 ** (s + 1)), contract.LR_MULTIPLIER: 1.0 - 0.5 * progress,
               contract.MUON_MOMENTUM: 0.85 + 0.1 * min(s / 300, 1.0), contract.WEIGHT_DECAY: 0.2 * (1 - progress),
               contract.PROGRESS: progress, contract.STEP_TIME_MS: dt, contract.TOKENS_PER_SEC: tokens_per_step / (dt / 1000),
               contract.MFU_PERCENT: 40.0}
        if s % layer_every == 0:
            for j, name in enumerate(names):
                frac = s / max(n_steps - 1, 1)
                rec[contract.layer_key(name, "grad_norm")] = 0.1 * (1 + 0.05 * j % 3) * grad_scale.get(name, 1.0) \
                    * math.exp(0.05 * rng.standard_normal())
                rec[contract.layer_key(name, "weight_norm")] = 10.0 * (1 + (norm_growth.get(name, 1.0) - 1) * frac)
                rec[contract.layer_key(name, "update_ratio")] = 0.01 * math.exp(0.05 * rng.standard_normal())
        if progress >= next_val or s == n_steps - 1:
            rec[contract.VAL_BPB] = float((l_inf + a * (s + 1.0) ** -alpha) / math.log(2) / 4.0)
            rec[contract.VAL_LOSS] = float(l_inf + a * (s + 1.0) ** -alpha + 0.05)
            next_val = (math.floor(progress / val_every) + 1) * val_every
            wall, evals = wall + EVAL_S, evals + EVAL_S
        rec[contract.WALL_S], rec[contract.EVAL_S] = wall, evals
        records.append(rec)
    return records


def cache_data() -> dict:
    """The run_summary.json "data" of a run on the prepare cache as it is now (as the harness's run logger writes it)."""
    path = contract.cache_path(contract.MANIFEST)
    if not path.exists():
        return {"error": f"no prepared data ({path} is missing): run `uv run prepare.py` first"}
    manifest = json.loads(path.read_text())
    return {"source": manifest["source"], "smoke_test": manifest["smoke_test"],
            "manifest_hash": manifest["manifest_hash"]}


def make_summary(records, val_bpb, commit="abc1234", train_sha256="0" * 64, status="ok", seed=42,
                 device="NVIDIA H100 80GB HBM3", started_at=None, budget_s=300.0, config=None, error=None, **extra):
    last = records[-1] if records else {}
    summary = {k: None for k in contract.SUMMARY_KEYS}
    summary.update(
        status=status, val_bpb=val_bpb if status == "ok" else None, training_seconds=last.get(contract.TIME_S, 0.0),
        total_seconds=last.get(contract.TIME_S, 0.0) + 30, startup_seconds=20.0, peak_vram_mb=40000.0,
        mfu_percent=40.0, total_tokens_M=len(records) * 0.524288, num_steps=len(records), num_params_M=50.0,
        depth=4, seed=seed, device=device, torch_version="2.11.0", commit=commit, dirty=False,
        data=cache_data(), harness_hash=contract.harness_hash(ROOT), train_sha256=train_sha256,
        started_at=started_at or time.strftime("%Y-%m-%dT%H:%M:%S%z"), time_budget_s=budget_s,
        causality={"ok": True, "max_change": 0.0, "positions": [1024], "rows": 2} if status == "ok" else None,
        evaluator={"rows": 128, "batch_size": 128, "seconds": 1.0, "device": "cpu",
                   "train_process_s": last.get(contract.TIME_S, 0.0) + 30} if status == "ok" else None,
        harness_check={"ok": True, "changed": []} if status == "ok" else None,
        config=config or {"DEPTH": 4, "MATRIX_LR": 0.04, "CLOCK_WARMUP_STEPS": 2, "SEED": seed})
    if error:
        summary["error"] = error
    summary.update(extra)
    return summary


def seal_run(folder, summary: dict, metrics_text: str):
    """Write run_summary.json and a seal of it and of the metrics that names this helper as its writer:
    analyze.py takes the run only where a test accepts synthetic runs."""
    text = json.dumps(summary, indent=2)
    (Path(folder) / "run_summary.json").write_text(text)
    contract.write_seal(folder, summary.get("started_at"), text, hashlib.sha256(metrics_text.encode()).hexdigest(),
                        metrics_text.count("\n"),
                        summary.get("val_bpb") if summary.get("status") == "ok" else None,
                        sealed_by=contract.SEALED_BY_SYNTHETIC)


def stamped_log(summary: dict, body: str) -> str:
    """The run.log of the run that wrote `summary`: the stamp line the harness's run logger prints first (which
    tells analyze.py the log is that run's), then `body`."""
    return f"{contract.log_stamp(summary['started_at'])}\n{body}"


def write_run(folder, records=None, summary=None, log=None, truncate_metrics=False, stamp=True):
    """Write the files train.py leaves behind into `folder` (None: that file is absent). With a summary,
    run.log starts with its stamp line, as an honest run's does (stamp=False: a log without it)."""
    folder = Path(folder)
    for name in ("metrics.jsonl", "run_summary.json", "run.log"):
        (folder / name).unlink(missing_ok=True)
    if records is not None:
        text = "".join(json.dumps(r) + "\n" for r in records)
        if truncate_metrics:
            text = text[:-len(json.dumps(records[-1])) // 2 - 1]  # a half-written last line
        (folder / "metrics.jsonl").write_text(text)
    if summary is not None:
        seal_run(folder, summary, text if records is not None else "")
    if log is not None:
        (folder / "run.log").write_text(stamped_log(summary, log) if summary is not None and stamp else log)
