"""
A run, as the harness records it: train.py's instrumentation is a few calls on one object.

    run = start_run(globals())                 first thing: the lock, fresh files, the watchdog,
                                               the device
    run.warm_up_evaluation(model, batch_size)  compile every evaluation shape before the clock
                                               (fast path)
    run.start_clock(model, tokens, flops)      startup ends: the training clock starts
    with run.layer_stats(model, on) as s:      per-layer statistics of one optimizer step
    run.validation_point(model, batch_size)    a point of the validation curve, off the clock
    run.log_step(record)                       one metrics.jsonl line, stamped, derived fields added
    run.fail(status, error=...)                a failed run's summary (nan); a crash writes its own
    run.finish(model, batch_size)              the summary, then the model served to the evaluator

metrics.jsonl is a fresh file per run with one flushed line per step; run_summary.json is written
once, atomically; launch.py adds the evaluator's val_bpb (harness/runner.py) and seals it outside
the run directory (contract.write_seal). An uncaught exception
or SIGTERM writes a `crash` summary; the watchdog a `timeout` one. The previous run's summary is
deleted first, so a crash never leaves an earlier result behind.
"""

import hashlib
import json
import math
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from harness import (contract, data, device, evaluation, git, metric, proc, runner, selfcheck,
                     settings)
from harness.contract import HarnessError
from harness.tokenizer import Tokenizer

# progress-line cadence when stdout is a file, so run.log stays short and readable
PRINT_EVERY_S = 5.0
LOSS_EMA = 0.9        # the smoothing of train/loss_smooth (bias-corrected)
UPPER = re.compile(r"[A-Z][A-Z0-9_]*")  # the names capture_config records: train.py's constants
HARNESS_FIELDS = ("status", "val_bpb", "causality", "harness_check", "evaluator", "metrics_sha256",
                  "metrics_lines", "pre_clock_optimizer_steps", "device", "harness_hash",
                  "time_budget_s", "started_at", "compile", "torch_version")


def _jsonable(v):
    if v is None or isinstance(v, (bool, str, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return repr(v)


def capture_config(namespace: dict) -> dict:
    """Every UPPER_CASE constant of a module namespace (modules, classes and functions skipped)."""
    return {k: _jsonable(v) for k, v in sorted(namespace.items())
            if UPPER.fullmatch(k) and not (callable(v) or type(v).__name__ == "module")}


def process_start() -> float:
    """Epoch seconds at which this process started (its whole life is a run's total_seconds)."""
    age = proc.process_age(os.getpid())
    return time.time() - age if age is not None else _IMPORTED_AT


# where /proc cannot say (macOS): the harness's import, train.py's first line
_IMPORTED_AT = time.time()


def start_run(train_globals: dict, run_dir=".") -> "Run":
    """Start the run train.py is: call it first, with train.py's globals() (its constants are the
    run's config, read at the end)."""
    return Run(train_globals, run_dir)


class Run:
    """One training run's files, clock and end. See the module's docstring for the calls."""

    def __init__(self, train_globals: dict, run_dir="."):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / contract.RUN_METRICS
        self.summary_path = self.run_dir / contract.RUN_SUMMARY
        # the run lock: launch.py holds it from before run.log is opened until the run is sealed;
        # a train.py run on its own takes it itself
        self._run_lock = (None if evaluation.launcher_socket_given()
                          else runner.lock_run(self.run_dir))
        self.summary_path.unlink(missing_ok=True)
        self.metrics_path.unlink(missing_ok=True)  # made anew, with this process's umask
        self.t_start = process_start()
        self._clock_start = time.monotonic()  # the harness's own clock stamps (log_step)
        self._eval_start = metric.EVALUATION_CLOCK.seconds
        self._metrics_hash, self._metrics_lines = hashlib.sha256(), 0  # what log_step wrote
        self.started_at = contract.stamp(time.time())
        self._globals = train_globals
        print(contract.log_stamp(self.started_at), flush=True)  # run.log's first line: whose it is
        self._file = open(self.metrics_path, "w")
        self._write_lock = threading.Lock()
        self._last, self._ema, self._printed, self._shown = None, 0.0, 0.0, False
        self.device, self.fast_path = None, False  # until the device is known (below)
        self.summary, self.clock, self.info = None, None, {}
        commit, dirty = git.state(self.run_dir)
        source = train_globals.get("__file__")  # the exact code that ran, so analyze.py can tell
        self.info.update(commit=commit, dirty=dirty,
                         train_sha256=contract.sha256_file(source) if source else None)
        self._previous_hook = sys.excepthook
        sys.excepthook = self._excepthook
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)
        self.watchdog = Watchdog(self)
        # the device and the data: a failure here is a crash summary with the cause
        self.device = device.autodetect_device()
        self.fast_path = self.device.type == "cuda" or settings.CPU_FAST_PATH
        self._pre_clock_steps = {}  # id(optimizer) -> its steps before the training clock started
        from torch.optim.optimizer import register_optimizer_step_post_hook
        register_optimizer_step_post_hook(self._count_step)
        self.manifest = data.load_manifest()
        self.tokenizer = Tokenizer.from_directory()
        print(f"harness: {device.device_description(self.device)} | budget "
              f"{settings.TIME_BUDGET:.0f}s | data: {data.data_label(self.manifest)}", flush=True)

    # -- before the clock ------------------------------------------------------------------------

    def warm_up_evaluation(self, model, batch_size: int):
        """Compile every batch shape the evaluations use (call in eval mode, under their
        autocast)."""
        metric.warm_up_evaluation(model, self.tokenizer, batch_size)

    def start_clock(self, model, tokens_per_step: int, flops_per_token: float):
        """Startup (imports, setup, compilation) ends here: the training clock starts. The model's
        size and a step's tokens and FLOPs give the throughput and MFU of every step."""
        self.clock = {"tokens": tokens_per_step, "flops": flops_per_token,
                      "peak": device.peak_flops(self.device),
                      "compiled": device.compile_counters() if self.fast_path else None}
        self.info.update(startup_seconds=time.time() - self.t_start,
                         num_params_M=sum(p.numel() for p in model.parameters()) / 1e6,
                         pre_clock_optimizer_steps=max(self._pre_clock_steps.values(), default=0))

    def _count_step(self, optimizer, args, kwargs):
        """Every optimizer's step() (torch's global hook): the ones before the clock are counted."""
        if self.clock is None:
            key = id(optimizer)
            self._pre_clock_steps[key] = self._pre_clock_steps.get(key, 0) + 1

    # -- during the clock ------------------------------------------------------------------------

    @contextmanager
    def layer_stats(self, model, enabled: bool = True):
        """Around optimizer.step(): the dict it yields holds each parameter matrix's gradient
        norm, weight norm and update ratio afterwards (empty when not `enabled`)."""
        stats = {}
        probe = LayerStats(model) if enabled else None
        if probe:
            probe.before_step()
        yield stats
        if probe:
            stats.update(probe.after_step())

    def validation_point(self, model, batch_size: int) -> dict:
        """val/bpb and val/loss on the small fixed validation slice (call in eval mode under the
        evaluation's autocast); the time it takes is off the training clock."""
        bpb, loss = metric.evaluate_val(model, self.tokenizer, batch_size, curve=True)
        return {contract.VAL_BPB: bpb, contract.VAL_LOSS: loss}

    def log_step(self, record: dict):
        """Write one metrics.jsonl line: the step's record, the fields derived from it (the smoothed
        loss, progress, throughput, MFU) and the harness's clock stamps, none of which train.py may
        supply; print the progress line now and then."""
        if self.clock is None:
            raise HarnessError("run.log_step before run.start_clock(model, tokens, flops)")
        owned = sorted(set(record) & {*contract.HARNESS_STEP_KEYS, *contract.DERIVED_STEP_KEYS})
        if owned:
            raise HarnessError(f"metrics keys {', '.join(owned)}: stamped by the harness, "
                               f"not by train.py")
        record = {**record, **self._derived(record),
                  contract.WALL_S: time.monotonic() - self._clock_start,
                  contract.EVAL_S: metric.EVALUATION_CLOCK.seconds - self._eval_start}
        problems = contract.step_record_problems(record)
        if problems:
            raise HarnessError(f"metrics record of step {record.get(contract.STEP)} breaks the "
                               f"contract: {problems[:3]}")
        line = json.dumps(record) + "\n"
        self._file.write(line)
        self._file.flush()
        self._metrics_hash.update(line.encode())
        self._metrics_lines += 1
        self._last = record
        self._shown = (sys.stdout.isatty() or contract.VAL_BPB in record
                       or time.monotonic() - self._printed >= PRINT_EVERY_S)
        if self._shown:
            self._print_progress(record)

    def _derived(self, record: dict) -> dict:
        loss, step_s = record.get(contract.TRAIN_LOSS), record.get(contract.STEP_TIME_MS)
        if not (contract.finite_number(loss) and contract.finite_number(step_s) and step_s > 0):
            return {}  # step_record_problems names what is missing
        self._ema = LOSS_EMA * self._ema + (1 - LOSS_EMA) * loss
        tokens_per_s = self.clock["tokens"] / (step_s / 1000)
        peak = self.clock["peak"]
        return {contract.TRAIN_LOSS_SMOOTH: self._ema / (1 - LOSS_EMA ** (self._metrics_lines + 1)),
                contract.PROGRESS: min(record.get(contract.TIME_S, 0.0) / settings.TIME_BUDGET,
                                       1.0),
                contract.TOKENS_PER_SEC: tokens_per_s,
                contract.MFU_PERCENT: (100 * self.clock["flops"] * tokens_per_s / peak if peak
                                       else 0.0)}

    def _print_progress(self, r: dict, end: bool = False):
        self._printed = time.monotonic()
        val = f" | val_bpb: {r[contract.VAL_BPB]:.4f}" if contract.VAL_BPB in r else ""
        remaining = max(0.0, settings.TIME_BUDGET - r[contract.TIME_S])
        line = (f"step {r[contract.STEP]:05d} ({100 * r[contract.PROGRESS]:.1f}%) | loss: "
                f"{r[contract.TRAIN_LOSS_SMOOTH]:.6f} | lrm: {r[contract.LR_MULTIPLIER]:.2f} | dt: "
                f"{r[contract.STEP_TIME_MS]:.0f}ms | tok/sec: {r[contract.TOKENS_PER_SEC]:,.0f} | "
                f"mfu: {r[contract.MFU_PERCENT]:.1f}% | remaining: {remaining:.0f}s{val}")
        if sys.stdout.isatty() and not end:
            print(f"\r{line}    ", end="", flush=True)
        else:
            print(line, flush=True)

    # -- the end ---------------------------------------------------------------------------------

    def set(self, **fields):
        """Record summary fields of train.py's own (not the ones only the harness writes)."""
        owned = sorted(set(fields) & set(HARNESS_FIELDS))
        if owned:
            raise HarnessError(f"run_summary.json's {', '.join(owned)}: written by the harness, "
                               f"not by train.py")
        self.info.update(fields)

    def finish(self, model, batch_size: int) -> dict:
        """The end of a finished run: the harness checks that its own code is as imported, writes
        the summary without a number, then serves the model's logits to launch.py's evaluator
        (harness/evaluation.py), a process train.py never ran in, which alone computes val_bpb;
        launch.py adds it, seals the summary and prints the final block. Run without launch.py
        (`python train.py`, for debugging), it evaluates here and prints an unsealed number that
        analyze.py does not believe."""
        if self._last is not None and (not self._shown or sys.stdout.isatty()):
            self._print_progress(self._last, end=True)
        fields = {"harness_check": selfcheck.harness_check(self),
                  "peak_vram_mb": device.peak_memory_mb(self.device), **self._throughput()}
        sock = evaluation.launcher_socket()
        if sock is None:
            print("note: train.py ran without launch.py: this val_bpb is unsealed and analyze.py "
                  f"will not believe it; train with `{contract.TRAIN_COMMAND}`", flush=True)
            fields["val_bpb"] = metric.evaluate_val(model, self.tokenizer, batch_size,
                                                    fresh=True)[0]
        summary = self._write("ok", fields)
        if sock is not None:
            evaluation.serve(model, sock, batch_size)
        self.watchdog.stop()
        if sock is None:
            print(f"---\n{'val_bpb:':<18}{summary['val_bpb']:.6f}  (unsealed)", flush=True)
        return summary

    def _throughput(self) -> dict:
        """MFU over the steps on the clock, and the tokens of every step."""
        last = self._last or {}
        steps, seconds = last.get(contract.STEP, -1) + 1, last.get(contract.TIME_S, 0.0)
        clock = self.clock or {"tokens": 0, "flops": 0, "peak": None}
        timed = max(steps - contract.warmup_steps({"config": capture_config(self._globals)}), 0)
        flops = clock["flops"] * timed * clock["tokens"]
        return {"mfu_percent": 100 * flops / seconds / clock["peak"] if clock["peak"] and seconds
                else 0.0, "total_tokens_M": steps * clock["tokens"] / 1e6}

    def fail(self, status: str, **fields) -> dict:
        """Write a failed run's summary (first call wins: a watchdog and a crash cannot both write
        one). A finished run ends with finish() instead."""
        if status == "ok" or set(fields) & {"val_bpb", "causality", "harness_check"}:
            raise HarnessError("val_bpb is the harness's: end a finished run with "
                               "run.finish(model, batch_size)")
        return self._write(status, fields)

    def _compile_stats(self):
        """torch.compile's counts on the fast path, and how many came after the clock started."""
        if not self.fast_path or "torch._dynamo" not in sys.modules:
            return None
        now = device.compile_counters()
        stats = {"backend": self._globals.get("COMPILE_BACKEND"), **now}
        before = (self.clock or {}).get("compiled")
        if before is not None:
            stats.update(graphs_in_loop=now["graphs"] - before["graphs"],
                         recompiles_in_loop=now["recompiles"] - before["recompiles"])
        return stats

    def _write(self, status: str, fields: dict) -> dict:
        assert status in contract.TRAIN_STATUSES, status
        with self._write_lock:
            if self.summary is not None:
                return self.summary
            self._file.flush()
            summary = self._summary(status, fields)
            contract.atomic_write(self.summary_path, json.dumps(summary, indent=2) + "\n")
            self.summary = summary  # launch.py seals it once this process and its children end
            return summary

    def _summary(self, status: str, fields: dict) -> dict:
        last, config = self._last or {}, capture_config(self._globals)
        summary = {k: None for k in contract.SUMMARY_KEYS}
        summary.update(num_steps=last.get(contract.STEP, -1) + 1,
                       training_seconds=last.get(contract.TIME_S, 0.0),
                       seed=config.get("SEED"), depth=config.get("DEPTH"))
        summary.update(self.info)
        summary.update(fields)
        # what log_step wrote: lines added, removed or edited later do not match (the seal)
        summary.update(metrics_sha256=self._metrics_hash.hexdigest(),
                       metrics_lines=self._metrics_lines)
        torch = sys.modules.get("torch")
        summary.update(status=status, started_at=self.started_at,
                       total_seconds=time.time() - self.t_start, time_budget_s=settings.TIME_BUDGET,
                       harness_hash=contract.harness_hash(Path(__file__).resolve().parent.parent),
                       device=device.hardware_identity(), config=config,
                       compile=self._compile_stats(),
                       torch_version=torch.__version__ if torch else None)
        try:
            manifest = data.load_manifest()
            summary["data"] = {"source": manifest["source"], "smoke_test": manifest["smoke_test"],
                               "manifest_hash": manifest["manifest_hash"]}
        except HarnessError as e:
            summary["data"] = {"error": str(e)}
        return summary

    def _excepthook(self, etype, value, tb):
        self.fail("crash", error=f"{etype.__name__}: {value}")
        if isinstance(value, HarnessError):
            print(f"error: {value}", file=sys.stderr)
        else:
            self._previous_hook(etype, value, tb)

    def _on_sigterm(self, signum, frame):
        # a second SIGTERM must not cut the summary short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt(f"terminated by SIGTERM after {time.time() - self.t_start:.0f} s: "
                                f"killed from outside (a tool or supervisor timeout, or a stop), "
                                f"not by an error in train.py")


class LayerStats:
    """Per-parameter-matrix gradient norm, weight norm and update-to-weight ratio of one optimizer
    step: `before_step()` after backward, `after_step()` after optimizer.step(). All norms are
    computed on the device and copied to the host together, so a measurement costs one sync."""

    def __init__(self, model):
        self.named = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
        self._grad_norms = self._before = None

    def before_step(self):
        import torch
        params = [p for _, p in self.named]
        self._grad_norms = torch._foreach_norm([p.grad if p.grad is not None
                                                else torch.zeros_like(p) for p in params])
        self._before = [p.detach().clone() for p in params]

    def after_step(self) -> dict:
        import torch
        params = [p.detach() for _, p in self.named]
        weight_norms = torch._foreach_norm(params)
        update_norms = torch._foreach_norm(torch._foreach_sub(params, self._before))
        table = torch.stack([torch.stack(self._grad_norms), torch.stack(weight_norms),
                             torch.stack(update_norms)]).float().cpu().tolist()  # the one sync
        self._grad_norms = self._before = None
        stats = {}
        for i, (name, _) in enumerate(self.named):
            grad, weight, update = table[0][i], table[1][i], table[2][i]
            stats[contract.layer_key(name, "grad_norm")] = grad
            stats[contract.layer_key(name, "weight_norm")] = weight
            stats[contract.layer_key(name, "update_ratio")] = update / weight if weight > 0 else 0.0
        return stats


class Watchdog:
    """Ends a run that has overrun its budget by a wide margin (a hang) with status "timeout",
    before anything outside kills it (settings.run_limits)."""

    def __init__(self, run: Run, limit_s: float = None):
        self.run = run
        self.limit_s = limit_s or settings.WATCHDOG_S
        self._done = threading.Event()
        threading.Thread(target=self._watch, name="watchdog", daemon=True).start()

    def _watch(self):
        if self._done.wait(self.limit_s):
            return
        message = (f"watchdog: run exceeded {self.limit_s:.0f}s of wall time (budget "
                   f"{settings.TIME_BUDGET:.0f}s), killing it as hung")
        self.run.fail("timeout", error=message)
        print(f"\nFAIL: {message}", file=sys.stderr, flush=True)
        os._exit(settings.TIMEOUT_EXIT_CODE)

    def stop(self):
        self._done.set()
