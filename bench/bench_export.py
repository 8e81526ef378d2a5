"""
Route (a) of issue 19, measured on CPU: can the final evaluation run an exported graph of the
agent's model (`torch.export`) in a clean process, instead of asking train.py's process for
logits (route (b), harness/evaluation.py, measured by bench_evaluator.py)? For the model train.py
builds on this machine, in its CPU configuration (SDPA attention, fp32) and in its fast path
(AUTORESEARCH_CPU_FAST_PATH=1: flex_attention, bf16 autocast), this measures:

- the seconds of `torch.export.export(model, (idx,))` at the evaluation's shape (EVAL_BATCH_SIZE
  rows x MAX_SEQ_LEN), as called and under torch.no_grad();
- whether `torch.export.save` + `torch.export.load` round-trips (else the exception's class and
  first line), the file's size and the seconds of each;
- the seconds of a pass over the evaluation's batches (the evaluator's own inputs, its 2 probes
  included: harness.evaluation.evaluate run with a recording model) by the eager model, the exported
  program and the loaded one, and the largest difference of their logits from the eager ones;
- a fresh `python -I` process that imports torch only (no train.py, no harness): it loads the saved
  file, runs the same batches, and reports its seconds, its peak RSS and the difference;
- the bench process's peak RSS after each stage;
- an agent-style adversarial model whose forward changes its logits after COUNTER_LIMIT calls (a
  Python counter; a buffer counter through torch.where; a Python `if` on the buffer): what export
  makes of it (a branch fixed at export, the state carried into the graph, or an error).

train.py is not copied: its own text is run up to its model setup (SETUP_END), in a child process
per configuration (harness/settings.py reads the environment once, at import).

Usage (the prepare cache must be prepared: `uv run prepare.py`, or --offline for the smoke corpus):
    uv run bench/bench_export.py --repeats 3 --out bench/results/export-cpu-<date>.json
"""

import argparse
import contextlib
import inspect
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import envelope, timings, write_result  # noqa: E402
from train_variants import ROOT  # noqa: E402  (and the repository on sys.path)

# train.py's first line after its model setup: its text is run up to there, nothing after it
SETUP_END = "\nnum_params = "
# each configuration measured -> its AUTORESEARCH_CPU_FAST_PATH
CONFIGS = {"sdpa_fp32": "0", "flex_bf16": "1"}
DEFAULT_REPEATS = 3       # timed passes over the evaluation's batches, per way of running the model
SEED = 0                  # the evaluation's batch order and probe cuts (the evaluator's are random)
CHILD_TIMEOUT_S = 1800    # one configuration's child process, all its stages
FRESH_TIMEOUT_S = 900     # the fresh `python -I` process that runs the saved file
COUNTER_LIMIT = 2         # the adversarial model shifts its logits once called more than this often
SHIFT = 1.0               # ... by this much, every logit
MATCH_TOLERANCE = 1e-4    # logits within this of an expected value count as that value
ERROR_CHARS = 300         # an exception's first line, cut to this

# The fresh process: the interpreter in isolated mode (-I: no PYTHONPATH, no script directory, no
# user site), torch and the standard library only. argv: the saved program, the inputs, the
# reference logits (eager), "bfloat16" for the fast path's autocast or "float32", the repeats.
# Its peak RSS is VmHWM (see peak_rss_mb); ru_maxrss is kept beside it, to show the difference.
FRESH = """\
import contextlib, json, resource, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
program, inputs_path, reference_path, dtype, repeats = sys.argv[1:]
model = torch.export.load(program).module()
t2 = time.perf_counter()
inputs = torch.load(inputs_path)
autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16"
            else contextlib.nullcontext())
seconds = []
for _ in range(int(repeats)):
    t = time.perf_counter()
    with torch.no_grad(), autocast:
        for x in inputs:
            logits = model(x)
            del logits
    seconds.append(time.perf_counter() - t)
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
reference = torch.load(reference_path, mmap=True)
with torch.no_grad(), autocast:
    diff = max((model(x) - r).abs().max().item() for x, r in zip(inputs, reference))
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("train", "prepare", "harness"))
print(json.dumps({"isolated": sys.flags.isolated, "import_torch_s": t1 - t0, "load_s": t2 - t1,
                  "seconds": seconds, "peak_rss_mb_before_check": peak,
                  "ru_maxrss_mb_before_check": maxrss,
                  "max_abs_diff_vs_eager": diff, "project_modules_loaded": ours}))
"""


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def error(e: BaseException) -> dict:
    """An exception as its class and its first line."""
    lines = str(e).strip().splitlines()
    return {"class": type(e).__name__, "first_line": lines[0][:ERROR_CHARS] if lines else ""}


def peak_rss_mb() -> float:
    """This process's peak RSS so far: VmHWM, its memory's high-water mark since its exec (not
    ru_maxrss: a child started by vfork and exec begins with its parent's, measured here)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024  # kB there


def machine() -> dict:
    """What the timings ran on: nproc, the CPU's model name, memory, torch and its threads."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo
                  if line.startswith("model name")), platform.processor())
    meminfo = Path("/proc/meminfo").read_text().split()
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return {"nproc": int(nproc), "cpu_model": model,
            "mem_total_gib": round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "export_strict_default":
                inspect.signature(torch.export.export).parameters["strict"].default}


def train_setup(work: Path) -> dict:
    """train.py's globals once its model is set up: its own text up to SETUP_END, run in `work`
    (where the run's files land) under this process's environment (the CPU configuration, or the
    fast path). What the run installs process-wide (watchdog, excepthook, SIGTERM) is undone."""
    source = (ROOT / "train.py").read_text()
    if SETUP_END not in source:
        raise SystemExit(f"error: {SETUP_END.strip()!r} is not in train.py: update "
                         f"bench/bench_export.py's SETUP_END")
    hook, handler = sys.excepthook, signal.getsignal(signal.SIGTERM)
    os.chdir(work)
    namespace = {"__name__": "train_setup", "__file__": str(ROOT / "train.py")}
    exec(compile(source[:source.index(SETUP_END)], str(ROOT / "train.py"), "exec"), namespace)
    namespace["run"].watchdog.stop()
    sys.excepthook = hook
    signal.signal(signal.SIGTERM, handler)
    return namespace


def evaluation_inputs(model, ns: dict) -> tuple:
    """The batches the final evaluation feeds the model, in its order (its probes included): the
    harness's own evaluate(), run once with the eager model behind a recording `ask`. Returns
    (inputs, that evaluation's result)."""
    from harness import evaluation, metric
    from harness.tokenizer import get_token_bytes
    dev = ns["device"]
    rows = metric.val_rows(ns["tokenizer"], metric.eval_rows(dev.type), fresh=True)
    seen = []

    def ask(x):
        seen.append(x)
        with torch.no_grad(), ns["autocast"]:
            return model(x)

    result = evaluation.evaluate(ask, rows, get_token_bytes(dev), ns["EVAL_BATCH_SIZE"],
                                 ns["vocab_size"], random.Random(SEED))
    return seen, result


def passes(forward, inputs: list, repeats: int, autocast, reference=None) -> dict:
    """`repeats` timed passes of forward over inputs (no_grad, in autocast); the largest logit
    difference from `reference` (one tensor per input) when given."""
    seconds, diff = [], 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad(), autocast:
            for i, x in enumerate(inputs):
                logits = forward(x)
                if reference is not None:
                    diff = max(diff, (logits - reference[i]).abs().max().item())
                del logits
        seconds.append(time.perf_counter() - t)
    result = timings(seconds)
    if reference is not None:
        result["max_abs_diff_vs_eager"] = diff
    return result


def timed_export(module, x, autocast, no_grad: bool, repeats: int = 1) -> tuple:
    """(the last program or None, timings or {"error"}): torch.export.export(module, (x,)),
    `repeats` times, in train.py's evaluation autocast, under torch.no_grad() when no_grad."""
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        try:
            with torch.no_grad() if no_grad else contextlib.nullcontext(), autocast:
                program = torch.export.export(module, (x,))
        except Exception as e:
            return None, {"error": error(e), "seconds_before": seconds}
        seconds.append(time.perf_counter() - t)
    return program, timings(seconds)


def describe(program) -> dict:
    """What an exported program holds: its nodes, higher-order ops and constants; the buffers its
    graph writes in place (export's graph keeps in-place ops: the signature's buffers_to_mutate
    fills only once run_decompositions functionalises it), and that list as well."""
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    higher = sorted({str(n.target) for n in nodes
                     if isinstance(n.target, torch._ops.HigherOrderOperator)})
    buffers = program.graph_signature.inputs_to_buffers
    written = {buffers[a.name] for n in nodes if isinstance(n.target, torch._ops.OpOverload)
               and n.target._schema.is_mutable for a in n.args
               if isinstance(a, torch.fx.Node) and a.name in buffers}
    mutated = program.graph_signature.buffers_to_mutate.values()
    return {"nodes": len(program.graph.nodes), "higher_order_ops": higher,
            "constants": len(program.constants), "buffers_written_in_graph": sorted(written),
            "signature_buffers_to_mutate": sorted(mutated)}


# ---------------------------------------------------------------------------
# One configuration (a child process)
# ---------------------------------------------------------------------------

def save_and_load(program, path: Path) -> tuple:
    """(loaded program or None, its record): torch.export.save then torch.export.load."""
    record = {}
    try:
        t = time.perf_counter()
        torch.export.save(program, path)
        record.update(save_s=time.perf_counter() - t, file_mb=path.stat().st_size / 2**20)
    except Exception as e:
        return None, {**record, "ok": False, "save_error": error(e)}
    try:
        t = time.perf_counter()
        loaded = torch.export.load(path)
        record["load_s"] = time.perf_counter() - t
    except Exception as e:
        return None, {**record, "ok": False, "load_error": error(e)}
    return loaded, {**record, "ok": True}


def fresh_process(work: Path, program_path: Path, inputs: list, reference: list, dtype: str,
                  repeats: int) -> dict:
    """The saved program run by a fresh `python -I` process that imports torch only."""
    torch.save(inputs, work / "inputs.pt")
    torch.save(reference, work / "reference.pt")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-I", "-c", FRESH, str(program_path),
                           str(work / "inputs.pt"), str(work / "reference.pt"), dtype,
                           str(repeats)], cwd=work, capture_output=True, text=True,
                          timeout=FRESH_TIMEOUT_S)
    wall = time.perf_counter() - t
    (work / "reference.pt").unlink()
    if proc.returncode != 0:
        return {"ok": False, "stderr_tail": proc.stderr[-2000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"ok": True, "process_wall_s": wall, **result,
            **{k: v for k, v in timings(result["seconds"]).items() if k != "seconds"}}


def measure_config(work: Path, repeats: int) -> dict:
    """Every measure of route (a) for the model train.py builds under this process's environment."""
    t = time.perf_counter()
    ns = train_setup(work)
    model, autocast = ns["model"], ns["autocast"]
    model.eval()
    out = {"setup_s": time.perf_counter() - t, "attention": ns["ATTENTION_BACKEND"],
           "compute_dtype": str(ns["COMPUTE_DTYPE"]), "fast_path": ns["FAST_PATH"],
           "parameters": sum(p.numel() for p in model.parameters()),
           "eval_batch_size": ns["EVAL_BATCH_SIZE"], "max_seq_len": ns["MAX_SEQ_LEN"],
           "torch_threads": torch.get_num_threads(), "peak_rss_mb": {"setup": peak_rss_mb()}}
    inputs, evaluated = evaluation_inputs(model, ns)
    out["evaluation"] = {"batches": len(inputs), "shape": list(inputs[0].shape),
                         "val_bpb_eager": evaluated["val_bpb"]}
    with torch.no_grad(), autocast:
        reference = [model(x) for x in inputs]
    out["eager"] = passes(model, inputs, repeats, autocast)
    out["peak_rss_mb"]["eager"] = peak_rss_mb()
    # the process's first export (one-time costs included: route (a) pays them once per run),
    # as called, with the parameters requiring grad; then repeated under no_grad
    _, out["export_as_called"] = timed_export(model, inputs[0], autocast, no_grad=False)
    program, out["export_no_grad"] = timed_export(model, inputs[0], autocast, no_grad=True,
                                                  repeats=repeats)
    out["peak_rss_mb"]["export"] = peak_rss_mb()
    if program is None:
        return out
    out["program"] = describe(program)
    exported = program.module()
    out["exported"] = passes(exported, inputs, repeats, autocast, reference)
    try:  # export fixes the input's shape unless told otherwise: one row instead of the batch's
        with torch.no_grad(), autocast:
            exported(inputs[0][:1])
        out["exported_one_row"] = {"ok": True}
    except Exception as e:
        out["exported_one_row"] = {"ok": False, "error": error(e)}
    if ns["FAST_PATH"]:  # the ambient autocast is not part of the graph: does it run without?
        try:
            with torch.no_grad():
                exported(inputs[0])
            out["exported_outside_autocast"] = {"ok": True}
        except Exception as e:
            out["exported_outside_autocast"] = {"ok": False, "error": error(e)}
    out["peak_rss_mb"]["exported_run"] = peak_rss_mb()
    path = work / "model.pt2"
    loaded, out["save_load"] = save_and_load(program, path)
    if loaded is not None:
        out["loaded"] = passes(loaded.module(), inputs, repeats, autocast, reference)
        out["peak_rss_mb"]["loaded_run"] = peak_rss_mb()
        dtype = "bfloat16" if ns["FAST_PATH"] else "float32"
        out["fresh_process"] = fresh_process(work, path, inputs, reference, dtype, repeats)
    else:
        out["fresh_process"] = {"ok": False, "why": "nothing saved to load"}
    return out


# ---------------------------------------------------------------------------
# The adversarial model (a child process, the CPU configuration)
# ---------------------------------------------------------------------------

class PythonCounter(torch.nn.Module):
    """An agent's wrapper: a Python int counts the calls; past COUNTER_LIMIT, the logits shift."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, idx):
        self.calls += 1
        logits = self.inner(idx)
        if self.calls > COUNTER_LIMIT:
            logits = logits + SHIFT
        return logits


class BufferCounter(torch.nn.Module):
    """The same with the count in a buffer and the switch a tensor op (torch.where)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, idx):
        self.calls += 1
        logits = self.inner(idx)
        return torch.where(self.calls > COUNTER_LIMIT, logits + SHIFT, logits)


class BufferBranch(BufferCounter):
    """The count in a buffer, the switch a Python `if` on it (PythonCounter's forward)."""

    forward = PythonCounter.forward


def classify(logits, honest) -> str:
    """"honest", "shifted" (honest + SHIFT) or "other"."""
    if (logits - honest).abs().max().item() <= MATCH_TOLERANCE:
        return "honest"
    if (logits - honest - SHIFT).abs().max().item() <= MATCH_TOLERANCE:
        return "shifted"
    return "other"


def calls(module, x, honest, n: int) -> list:
    """What n successive calls of module(x) return, each classified."""
    with torch.no_grad():
        return [classify(module(x), honest) for _ in range(n)]


def counter_value(wrapper):
    value = wrapper.calls
    return value.item() if isinstance(value, torch.Tensor) else value


def adversarial_case(kind, inner, x, honest, calls_before: int, work: Path) -> dict:
    """One adversarial wrapper: called calls_before times (the agent's own evaluations), exported
    and saved (then loaded); a fresh eager one, the exported program and the loaded one each called
    COUNTER_LIMIT + 2 times."""
    n = COUNTER_LIMIT + 2
    eager = kind(inner)
    record = {"model": kind.__name__, "calls_before_export": calls_before,
              "eager_calls": calls(eager, x, honest, n)}
    wrapper = kind(inner)
    calls(wrapper, x, honest, calls_before)
    program, record["export"] = timed_export(wrapper, x, contextlib.nullcontext(), no_grad=True)
    record["counter_after_export"] = counter_value(wrapper)
    if program is None:
        return record
    record["program"] = describe(program)
    loaded, record["save_load"] = save_and_load(program, work / f"{kind.__name__}.pt2")
    record["exported_calls"] = calls(program.module(), x, honest, n)
    if "calls" in program.state_dict:  # the program's own copy of the buffer, after those calls
        record["program_buffer_after_calls"] = program.state_dict["calls"].item()
    if loaded is not None:
        record["loaded_calls"] = calls(loaded.module(), x, honest, n)
    return record


def measure_adversarial(work: Path) -> dict:
    """Each adversarial wrapper around the CPU configuration's model, on one row of SEQ_LEN (a
    length train.py prepared masks for)."""
    ns = train_setup(work)
    inner = ns["model"].eval()
    x = torch.randint(0, ns["vocab_size"], (1, ns["SEQ_LEN"]),
                      generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        honest = inner(x)
    cases = [(PythonCounter, 0), (PythonCounter, COUNTER_LIMIT), (BufferCounter, 0),
             (BufferBranch, 0)]
    return {"counter_limit": COUNTER_LIMIT, "shift": SHIFT, "shape": list(x.shape),
            "cases": [adversarial_case(kind, inner, x, honest, before, work)
                      for kind, before in cases]}


# ---------------------------------------------------------------------------
# The parent: one child per measurement
# ---------------------------------------------------------------------------

def child(name: str, fast_path: str, repeats: int) -> dict:
    """One measurement in a child process of its own (its environment, its peak RSS)."""
    env = {**os.environ, "AUTORESEARCH_CPU_FAST_PATH": fast_path}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as work:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--work", work,
                               "--repeats", str(repeats)], env=env, capture_output=True,
                              text=True, timeout=CHILD_TIMEOUT_S)
    if proc.returncode != 0:
        return {"failed": proc.returncode, "stderr_tail": proc.stderr[-4000:]}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]),
            "child_wall_s": time.perf_counter() - t}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = (measure_adversarial(args.work) if args.child == "adversarial"
                  else measure_config(args.work, args.repeats))
        print(json.dumps({**result, "process_peak_rss_mb": peak_rss_mb()}), flush=True)
        return 0
    result = {**envelope(__file__), **machine(), "repeats": args.repeats, "configs": {}}
    for name, fast_path in CONFIGS.items():
        result["configs"][name] = child(name, fast_path, args.repeats)
        print(name, json.dumps(result["configs"][name]), flush=True)
    result["adversarial"] = child("adversarial", "0", args.repeats)
    print("adversarial", json.dumps(result["adversarial"]), flush=True)
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
