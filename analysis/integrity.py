"""
Metric integrity: is a run's val_bpb a number the fixed harness produced, under the fixed rules?

An agent improves its number only by changing train.py. This module finds the other ways: an
edited evaluation (prepare.py, schema.py, analyze.py, analysis/), a tokenizer or validation data
that is no longer what prepare.py wrote, and a training time that the run's own step times do not
add up to, or that exceeds the budget. analyze.py marks a run with any problem `invalid`: it is
archived with its val_bpb for reference but never pooled, kept or counted as the best.

Each check is a function returning a list of problems, one actionable sentence each (empty: the
check passed). Only git subprocesses and file hashing: no torch, no import of prepare.py.
"""

import json
import math
from pathlib import Path

import schema
from analysis import gitops, stats
from analysis.store import StoreError

# What git must show unchanged: the files of the harness hash plus the analysis that judges the runs.
HARNESS_PATHSPECS = schema.HARNESS_FILES + ("analyze.py", "analysis/*.py")
MANIFEST = "manifest.json"
TOKENIZER_FILES = (("tokenizer/tokenizer.pkl", "tokenizer_sha256"), ("tokenizer/token_bytes.npy", "token_bytes_sha256"))
# train.py logs the same measured seconds into perf/step_time_ms and the clock, so an honest run agrees to
# float rounding. The margin lets an agent rework how its loop is timed (a sync that lands in the next
# step) without a false alarm, while any time that would matter for the result (over 5 %) is caught.
CLOCK_REL_TOLERANCE = 0.05
CLOCK_ABS_TOLERANCE_S = 1.0
RESTORE_HINT = "the evaluation harness is off limits to experiments"


def _agrees(a: float, b: float) -> bool:
    return abs(a - b) <= CLOCK_REL_TOLERANCE * max(abs(a), abs(b)) + CLOCK_ABS_TOLERANCE_S


def harness_git_problems(repo_root: Path, reference) -> list:
    """The harness files have no uncommitted changes, and none since the first run's commit."""
    if not gitops.is_repo(repo_root):
        return []
    problems = []
    status = gitops.git("status", "--porcelain", "--untracked-files=all", "--", *HARNESS_PATHSPECS, cwd=repo_root)
    for line in status.splitlines():
        path = line[3:].split(" -> ")[-1]
        if line.startswith("??"):
            problems.append(f"{path} is a new, uncommitted harness file: {RESTORE_HINT}; remove it (rm {path})")
        else:
            problems.append(f"{path} has uncommitted changes: {RESTORE_HINT}; restore it with `git checkout -- {path}`")
    commit = (reference or {}).get("commit")
    if commit:
        try:
            changed = gitops.git("diff", "--name-only", commit, "HEAD", "--", *HARNESS_PATHSPECS, cwd=repo_root)
        except StoreError as e:
            return problems + [f"cannot compare the harness with commit {commit} of the first run "
                               f"{reference.get('run_id')} ({e}): restore that commit, or start a new store"]
        for path in changed.splitlines():
            problems.append(f"{path} changed since commit {commit} of the first run {reference.get('run_id')}: "
                            f"{RESTORE_HINT}; restore it with `git checkout {commit} -- {path}` and commit")
    return problems


def harness_hash_problems(summary: dict, repo_root: Path) -> list:
    """The harness_hash the run recorded is that of the harness files here now."""
    try:
        now = schema.harness_hash(repo_root)
    except OSError as e:
        return [f"cannot hash the harness ({e}): restore {' and '.join(schema.HARNESS_FILES)} with git checkout"]
    claimed = summary.get("harness_hash")
    if claimed != now:
        files = " ".join(schema.HARNESS_FILES)
        return [f"the run's harness_hash {claimed} is not that of {' + '.join(schema.HARNESS_FILES)} here ({now}): "
                f"it ran under another evaluation harness; restore them (`git checkout -- {files}`) and train again"]
    return []


def data_problems(summary: dict, cache_dir: Path, reference) -> list:
    """The run's data is the prepared data in cache_dir (and the first run's): the manifest is as
    prepare.py wrote it, and the tokenizer and validation files still have the sha256 it recorded."""
    claimed = (summary.get("data") or {}).get("manifest_hash")
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        return [f"{path} is missing, but the run claims prepared data {claimed}: the tokenizer and validation "
                f"data cannot be verified; run `uv run prepare.py` and train again"] if claimed else []
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return [f"{path} is corrupt ({e.msg}): run `uv run prepare.py` again and train again"]
    problems = []
    recorded, actual = manifest.get("manifest_hash"), schema.manifest_hash(manifest)
    if actual != recorded:
        problems.append(f"{path} was edited after prepare.py wrote it (its content hashes to "
                        f"{actual}, not {recorded}): run `uv run prepare.py` again")
    if claimed != recorded:
        problems.append(f"the run used data manifest {claimed} but {path} is {recorded}: the data was prepared "
                        f"again during or after the run; train again on the current data")
    first = ((reference or {}).get("data") or {}).get("manifest_hash")
    if first and claimed != first:
        problems.append(f"the run used data manifest {claimed} but the first run {reference.get('run_id')} used "
                        f"{first}: the tokenizer and validation data are fixed for a store; prepare that data "
                        f"again, or start a new store (move .auto-log-research away) for new data")
    expected = [(rel, manifest.get(key)) for rel, key in TOKENIZER_FILES]
    expected += [(f.get("path"), f.get("sha256")) for f in manifest.get("val_files") or []]
    for rel, sha in expected:
        file = Path(cache_dir) / str(rel)
        if not sha:
            problems.append(f"{path} records no sha256 for {rel}: run `uv run prepare.py` again")
        elif not file.is_file():
            problems.append(f"{file} is missing: the prepared data is incomplete; run `uv run prepare.py` again")
        elif schema.sha256_file(file) != sha:
            problems.append(f"{file} is not the file prepare.py wrote (sha256 differs from {path}): the tokenizer "
                            f"and validation data are off limits; run `uv run prepare.py` again and train again")
    return problems


def clock_problems(summary: dict, records: list, reference) -> list:
    """The claimed training_seconds is the sum of the run's own timed step times, is where its training
    clock ended, stays within the budget (plus the step that crossed it), under the first run's budget."""
    if summary.get("status") != "ok" or not records:
        return []
    problems = []
    budget, first_budget = summary.get("time_budget_s"), (reference or {}).get("time_budget_s")
    if first_budget is not None and budget != first_budget:
        problems.append(f"time_budget_s {budget} differs from the first run {reference.get('run_id')}'s "
                        f"{first_budget}: every run of a store trains for the same budget; unset "
                        f"AUTORESEARCH_TIME_BUDGET (or set it as for the first run) and train again")
    warmup_steps = (summary.get("config") or {}).get("CLOCK_WARMUP_STEPS")
    first_warmup = ((reference or {}).get("config") or {}).get("CLOCK_WARMUP_STEPS")
    if (reference and reference.get("device") == summary.get("device") and first_warmup is not None
            and warmup_steps != first_warmup):
        problems.append(f"CLOCK_WARMUP_STEPS {warmup_steps} differs from the first run {reference.get('run_id')}'s "
                        f"{first_warmup} on this device: steps kept off the training clock are compute for free; "
                        f"set CLOCK_WARMUP_STEPS = {first_warmup} in train.py and train again")
    claimed = summary.get("training_seconds")
    if not schema.finite_number(claimed):
        return problems + [f"training_seconds {claimed!r} is not a number: the training clock is off limits; "
                           f"restore the timing code of train.py and train again"]
    warmup = int((summary.get("config") or {}).get("CLOCK_WARMUP_STEPS", 0) or 0)
    step_s = [r[schema.STEP_TIME_MS] / 1000 for r in stats.timed_steps(records, warmup)
              if schema.finite_number(r.get(schema.STEP_TIME_MS))]
    summed = math.fsum(step_s)
    if not _agrees(claimed, summed):
        problems.append(f"training_seconds {claimed:.1f} disagrees with the sum of the run's own step times, "
                        f"{summed:.1f} s over {len(step_s)} steps from step {warmup} on: the training clock is off "
                        f"limits; restore the timing code of train.py and train again")
    last = records[-1].get(schema.TIME_S)
    if not schema.finite_number(last) or not _agrees(claimed, last):
        problems.append(f"training_seconds {claimed:.1f} disagrees with the clock of the last metrics record "
                        f"({last}): the training clock is off limits; restore the timing code of train.py and "
                        f"train again")
    if schema.finite_number(budget) and step_s:
        allowed = budget + step_s[-1]  # the loop stops after the step that crosses the budget
        if claimed > allowed and not _agrees(claimed, allowed):
            problems.append(f"training_seconds {claimed:.1f} exceeds the time budget of {budget:g} s by more than "
                            f"the last step: every run trains for the same budget; restore the stopping rule "
                            f"of train.py and train again")
    return problems


def integrity_problems(summary: dict, records: list, repo_root: Path, cache_dir: Path, reference) -> list:
    """Every integrity problem of a finished run (empty: its val_bpb can be trusted). reference: the
    first ledger record (the harness and data every later run must share), or None for the first run."""
    repo_root = Path(repo_root)
    return (harness_git_problems(repo_root, reference) + harness_hash_problems(summary, repo_root)
            + data_problems(summary, cache_dir, reference) + clock_problems(summary, records, reference)
            + causality_problems(summary))


def causality_problems(summary: dict) -> list:
    """The harness's final evaluation probed the model (prepare.causality_probe): its logits at earlier
    positions must not move when only later tokens change, or the model reads the future."""
    probe = summary.get("causality")
    if not isinstance(probe, dict):
        return ["the summary has no causality probe: the final val_bpb was not the harness's own evaluation "
                "(train.py must end with logger.evaluate_and_finish); restore that ending of train.py"]
    if probe.get("ok") is not True:
        return [f"the logits at positions <= {probe.get('position')} changed by {probe.get('max_change')} when only "
                f"later tokens changed: the model reads the future (the targets), so its val_bpb is no language "
                f"model's; remove what lets a position see later tokens"]
    return []


HARNESS_MODULES = ("prepare", "schema")  # what train.py imports from the harness


def train_code_problems(code: str) -> list:
    """train.py may use the harness but not rebind it at run time, which would change the evaluation
    without changing a harness file: no assignment to `prepare.<name>` (directly, with setattr, or through
    sys.modules) and no redefinition of a name imported from prepare or schema (`evaluate_bpb = ...`)."""
    import ast
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []  # such a run crashed before producing a number
    modules, imported = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name in HARNESS_MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module in HARNESS_MODULES:
            imported |= {a.asname or a.name for a in node.names}
    problems = []

    def flag(node, what):
        problems.append(f"train.py line {node.lineno} {what}: {RESTORE_HINT}; remove it from train.py")

    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in imported:
            flag(node, f"redefines {node.name}, imported from the harness")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" \
                and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in modules:
            flag(node, f"sets an attribute of {node.args[0].id} with setattr")
        for target in (t for t0 in targets for t in ast.walk(t0)):
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                    and target.value.id in modules | imported and isinstance(target.ctx, ast.Store):
                flag(node, f"assigns {target.value.id}.{target.attr}")
            elif isinstance(target, ast.Name) and target.id in imported and isinstance(target.ctx, ast.Store):
                flag(node, f"rebinds {target.id}, imported from the harness")
            elif isinstance(target, ast.Subscript) and "modules" in ast.unparse(target.value):
                flag(node, "writes into sys.modules")
    return problems
