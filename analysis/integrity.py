"""
Metric integrity: is a run's val_bpb a number the fixed harness produced, under the fixed rules?

An agent improves its number only by changing train.py. This module finds the other ways: an
edited evaluation (prepare.py, harness/, launch.py, analyze.py, analysis/), a harness changed at
run time from train.py, a tokenizer or validation data that is no longer what prepare.py wrote, a
summary or metrics file that is not what the harness's logger wrote (its seal), and a training
time that the run's own step times or the harness's wall clock do not add up to, or that exceeds
the budget. analyze.py marks a run with any problem `invalid`: it is archived with its val_bpb
for reference but never pooled, kept or counted as the best.

Each check is a function returning a list of problems, one actionable sentence each (empty: the
check passed). Only git subprocesses and file hashing: no torch, no import of prepare.py.
"""

import json
import math
from pathlib import Path

from harness import contract, fixed, git, settings
from harness.contract import HarnessError
from analysis import stats

# The prepared files whose sha256 the manifest records, with the manifest's key of each.
TOKENIZER_FILES = ((f"{contract.TOKENIZER_DIR}/{contract.TOKENIZER_FILE}", "tokenizer_sha256"),
                   (f"{contract.TOKENIZER_DIR}/{contract.TOKEN_BYTES_FILE}", "token_bytes_sha256"))
# train.py logs the same measured seconds into perf/step_time_ms and the clock, so an honest run
# agrees to float rounding. The margin lets an agent rework how its loop is timed (a sync that lands
# in the next step) without a false alarm, while any time that would matter for the result (over
# 5 %) is caught.
CLOCK_REL_TOLERANCE = 0.05
CLOCK_ABS_TOLERANCE_S = 1.0
# Against the harness's wall clock an honest loop differs only by the bookkeeping between a step's
# end and its metrics line (building the record, printing), well under 1 % of a step; 2 % keeps a
# loaded machine from a false alarm while any compute moved off the clock that would matter shows.
HARNESS_CLOCK_REL_TOLERANCE = 0.02
RESTORE_HINT = "the evaluation harness is off limits to experiments"
# optimizer steps any one optimizer may take before the training clock starts: train.py's
# compilation warm-up (the fast path) takes one and restores the weights and the optimizer's state;
# more is training for free
PRE_CLOCK_STEPS_ALLOWED = 1
# train.py's wall time off the training clock (startup, compilation, the clock's warm-up steps,
# validation points; launch.py measures it, the final evaluation excluded) may exceed the store's
# reference run's on the same device by this factor plus this slack: a larger model compiles and
# evaluates longer, a loaded machine starts slower. More is time that could have trained before
# the clock started in a way no optimizer counts (a hand-written update).
UNTIMED_FACTOR = 1.5
UNTIMED_SLACK_S = 30.0
# What each difference of a fixed file from HEAD (harness/fixed.py) is, and how to undo it. An
# edit git does not show (--assume-unchanged, --skip-worktree) is a difference all the same: the
# flag is cleared with `git update-index --no-assume-unchanged --no-skip-worktree`.
FIX_HINTS = {
    "changed": ("has uncommitted changes: {hint}; restore it with `git update-index "
                "--no-assume-unchanged --no-skip-worktree {path} && git checkout -- {path}`"),
    "new": "is a new, uncommitted harness file: {hint}; remove it (rm {path})",
    "missing": "is missing: {hint}; restore it with `git checkout -- {path}`",
    "bytecode": ("is compiled bytecode that Python loads instead of its source but holds other "
                 "code: {hint}; remove it (rm {path})"),
}


def _agrees(a: float, b: float) -> bool:
    return abs(a - b) <= CLOCK_REL_TOLERANCE * max(abs(a), abs(b)) + CLOCK_ABS_TOLERANCE_S


def harness_git_problems(repo_root: Path, reference) -> list:
    """The fixed files on disk are, byte for byte, those of HEAD (harness/fixed.py: their content
    against git's objects, never git's view of the working tree, which an index flag or an ignore
    rule hides an edit from), and HEAD's are those of the first run's commit."""
    if not git.is_repo(repo_root):
        return []
    problems = []
    try:
        found = fixed.differences(repo_root, "HEAD") + fixed.bytecode_problems(repo_root)
    except (HarnessError, OSError) as e:
        return [f"cannot compare the harness files with HEAD ({e}): {RESTORE_HINT}; restore "
                f"them with `git checkout HEAD -- {' '.join(contract.FIXED_PATHSPECS)}`"]
    for path, what in found:
        problems.append(f"{path} {FIX_HINTS[what].format(path=path, hint=RESTORE_HINT)}")
    commit = (reference or {}).get("commit")
    if commit:
        try:
            changed = git.git("diff", "--name-only", commit, "HEAD", "--",
                              *contract.FIXED_PATHSPECS, cwd=repo_root)
        except HarnessError as e:
            return problems + [f"cannot compare the harness with commit {commit} of the first run "
                               f"{reference.get('run_id')} ({e}): restore that commit, or start a "
                               f"new store"]
        for path in changed.splitlines():
            problems.append(f"{path} changed since commit {commit} of the first run "
                            f"{reference.get('run_id')}: {RESTORE_HINT}; restore it with "
                            f"`git checkout {commit} -- {path}` and commit")
    return problems


def harness_hash_problems(summary: dict, repo_root: Path) -> list:
    """The harness_hash the run recorded is that of the harness files here now."""
    try:
        now = contract.harness_hash(repo_root)
    except OSError as e:
        return [f"cannot hash the harness ({e}): restore prepare.py and harness/ with git "
                f"checkout"]
    claimed = summary.get("harness_hash")
    if claimed != now:
        files = " ".join(contract.harness_files(repo_root))
        return [f"the run's harness_hash {claimed} is not that of prepare.py + harness/ here "
                f"({now}): it ran under another evaluation harness; restore them "
                f"(`git checkout -- {files}`) and train again"]
    return []


def data_problems(summary: dict, cache_dir: Path, reference) -> list:
    """The run's data is the prepared data in cache_dir (and the first run's): the manifest is as
    prepare.py wrote it, and the tokenizer and validation files still have the sha256 it
    recorded."""
    claimed = (summary.get("data") or {}).get("manifest_hash")
    path = Path(cache_dir) / contract.MANIFEST
    if not path.exists():
        return [f"{path} is missing, but the run claims prepared data {claimed}: the tokenizer "
                f"and validation data cannot be verified; run `uv run prepare.py` and train "
                f"again"] if claimed else []
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return [f"{path} is corrupt ({e.msg}): run `uv run prepare.py` again and train again"]
    problems = []
    recorded, actual = manifest.get("manifest_hash"), contract.manifest_hash(manifest)
    if actual != recorded:
        problems.append(f"{path} was edited after prepare.py wrote it (its content hashes to "
                        f"{actual}, not {recorded}): run `uv run prepare.py` again")
    if claimed != recorded:
        problems.append(f"the run used data manifest {claimed} but {path} is {recorded}: the data "
                        f"was prepared again during or after the run; train again on the current "
                        f"data")
    first = ((reference or {}).get("data") or {}).get("manifest_hash")
    if first and claimed != first:
        problems.append(f"the run used data manifest {claimed} but the first run "
                        f"{reference.get('run_id')} used {first}: the tokenizer and validation "
                        f"data are fixed for a store; prepare that data again, or start a new "
                        f"store (move .auto-log-research away) for new data")
    expected = [(rel, manifest.get(key)) for rel, key in TOKENIZER_FILES]
    expected += [(f.get("path"), f.get("sha256")) for f in manifest.get("val_files") or []]
    for rel, sha in expected:
        file = Path(cache_dir) / str(rel)
        if not sha:
            problems.append(f"{path} records no sha256 for {rel}: run `uv run prepare.py` again")
        elif not file.is_file():
            problems.append(f"{file} is missing: the prepared data is incomplete; run "
                            f"`uv run prepare.py` again")
        elif contract.sha256_file(file) != sha:
            problems.append(f"{file} is not the file prepare.py wrote (sha256 differs from "
                            f"{path}): the tokenizer and validation data are off limits; run "
                            f"`uv run prepare.py` again and train again")
    return problems


def clock_problems(summary: dict, records: list, reference) -> list:
    """The claimed training_seconds is the sum of the run's own timed step times, is where its
    training clock ended, stays within the budget (plus the step that crossed it), under the first
    run's budget."""
    if summary.get("status") != "ok" or not records:
        return []
    problems = []
    budget, first_budget = summary.get("time_budget_s"), (reference or {}).get("time_budget_s")
    if first_budget is not None and budget != first_budget:
        problems.append(f"time_budget_s {budget} differs from the first run "
                        f"{reference.get('run_id')}'s {first_budget}: every run of a store trains "
                        f"for the same budget; unset AUTORESEARCH_TIME_BUDGET (or set it as for "
                        f"the first run) and train again")
    warmup_steps = (summary.get("config") or {}).get(contract.WARMUP_KEY)
    first_warmup = ((reference or {}).get("config") or {}).get(contract.WARMUP_KEY)
    if (reference and reference.get("device") == summary.get("device")
            and first_warmup is not None and warmup_steps != first_warmup):
        problems.append(f"CLOCK_WARMUP_STEPS {warmup_steps} differs from the first run "
                        f"{reference.get('run_id')}'s {first_warmup} on this device: steps kept "
                        f"off the training clock are compute for free; set CLOCK_WARMUP_STEPS = "
                        f"{first_warmup} in train.py and train again")
    claimed = summary.get("training_seconds")
    if not contract.finite_number(claimed):
        return problems + [f"training_seconds {claimed!r} is not a number: the training clock is "
                           f"off limits; restore the timing code of train.py and train again"]
    warmup = contract.warmup_steps(summary)
    timed = stats.timed_steps(records, warmup)
    step_s = [r[contract.STEP_TIME_MS] / 1000 for r in timed
              if contract.finite_number(r.get(contract.STEP_TIME_MS))]
    summed = math.fsum(step_s)
    every_step = [r.get(contract.STEP) for r in timed] == list(range(warmup, warmup + len(timed)))
    # a run that logs every Nth step is checked by the harness clock
    if every_step and not _agrees(claimed, summed):
        problems.append(f"training_seconds {claimed:.1f} disagrees with the sum of the run's own "
                        f"step times, {summed:.1f} s over {len(step_s)} steps from step {warmup} "
                        f"on: the training clock is off limits; restore the timing code of "
                        f"train.py and train again")
    last = records[-1].get(contract.TIME_S)
    if not contract.finite_number(last) or not _agrees(claimed, last):
        problems.append(f"training_seconds {claimed:.1f} disagrees with the clock of the last "
                        f"metrics record ({last}): the training clock is off limits; restore the "
                        f"timing code of train.py and train again")
    if contract.finite_number(budget) and step_s:
        allowed = budget + step_s[-1]  # the loop stops after the step that crosses the budget
        if claimed > allowed and not _agrees(claimed, allowed):
            problems.append(f"training_seconds {claimed:.1f} exceeds the time budget of "
                            f"{budget:g} s by more than the last step: every run trains for the "
                            f"same budget; restore the stopping rule of train.py and train again")
    return problems


def integrity_problems(summary: dict, records: list, repo_root: Path, cache_dir: Path, reference,
                       run_dir: Path = None, metrics_sha256: str = None,
                       device_reference: dict = None) -> list:
    """Every integrity problem of a finished run (empty: its val_bpb can be trusted). reference:
    the first finished run of the store (the harness and data every later run must share), or None
    for the first run; device_reference: the first finished run on the run's device (the bound of
    its time off the clock), or None. run_dir and metrics_sha256: where the run's files are and
    the hash of its metrics.jsonl, for the harness's seal (None: the seal is not checked)."""
    repo_root = Path(repo_root)
    seal = seal_problems(summary, Path(run_dir), metrics_sha256) if run_dir is not None else []
    return (harness_git_problems(repo_root, reference) + harness_hash_problems(summary, repo_root)
            + data_problems(summary, cache_dir, reference) + seal
            + clock_problems(summary, records, reference)
            + harness_clock_problems(summary, records) + pre_clock_problems(summary)
            + untimed_problems(summary, device_reference)
            + runtime_harness_problems(summary)
            + evaluator_problems(summary) + causality_problems(summary))


def seal_problems(summary: dict, run_dir: Path, metrics_sha256) -> list:
    """run_summary.json and metrics.jsonl are what the harness's logger wrote (its seal in the
    prepare cache, contract.seal_path), and val_bpb is the number its own final evaluation
    computed."""
    path = contract.seal_path(run_dir, summary.get("started_at"))
    if not path.is_file():
        return [f"run_summary.json has no seal from the harness ({path} is missing): train.py ran "
                f"without launch.py, or the summary's started_at was changed; train with "
                f"`{contract.TRAIN_COMMAND}`"]
    try:
        seal = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return [f"the harness's seal {path} is corrupt ({e.msg}): train again"]
    problems = sealer_problems(seal.get("sealed_by"))
    if contract.sha256_file(run_dir / contract.RUN_SUMMARY) != seal.get("summary_sha256"):
        problems.append("run_summary.json was changed after the harness wrote it (it no longer "
                        "matches the seal): the summary is the harness's; remove what rewrites it "
                        "from train.py and train again")
    if metrics_sha256 != seal.get("metrics_sha256"):
        problems.append(f"metrics.jsonl is not what the harness's logger wrote "
                        f"({seal.get('metrics_lines')} lines sealed): lines were added, removed or "
                        f"edited outside run.log_step; log through run.log_step only and train "
                        f"again")
    if summary.get("val_bpb") != seal.get("val_bpb"):
        problems.append(f"val_bpb {summary.get('val_bpb')} is not the number the harness's final "
                        f"evaluation computed ({seal.get('val_bpb')}): end train.py with "
                        f"run.finish and train again")
    return problems


def sealer_problems(sealed_by) -> list:
    """The seal is the evaluator's, or a synthetic run's where a test accepts those."""
    if sealed_by == contract.SEALED_BY_EVALUATOR:
        return []
    if sealed_by == contract.SEALED_BY_SYNTHETIC:
        if settings.ACCEPT_SYNTHETIC:
            return []
        return [f"the run was sealed by the tests' synthetic-run helper ({sealed_by}), not by the "
                f"harness's evaluator: it never trained; train with `{contract.TRAIN_COMMAND}`"]
    return [f"the run's seal names {sealed_by!r} as its writer, not the harness's evaluator: "
            f"train again with `{contract.TRAIN_COMMAND}`"]


def pre_clock_problems(summary: dict) -> list:
    """No training before the clock: the harness counts every optimizer step before
    run.start_clock (summary["pre_clock_optimizer_steps"], the most of any one optimizer)."""
    steps = summary.get("pre_clock_optimizer_steps")
    if summary.get("status") != "ok" or steps is None:
        return []  # a failed run, or a store's run from before the count
    if not isinstance(steps, int) or steps > PRE_CLOCK_STEPS_ALLOWED:
        return [f"an optimizer took {steps} steps before the training clock started (at most "
                f"{PRE_CLOCK_STEPS_ALLOWED}, the compilation warm-up, which is undone): that is "
                f"training off the clock; move it into the timed loop and train again"]
    return []


def untimed_seconds(summary: dict):
    """train.py's wall time off its training clock and outside the final evaluation, in seconds,
    from launch.py's and the evaluator's measures (None: a run without them)."""
    evaluator = summary.get("evaluator")
    if not isinstance(evaluator, dict):
        return None
    parts = (evaluator.get("train_process_s"), summary.get("training_seconds"),
             evaluator.get("seconds"))
    if not all(contract.finite_number(p) for p in parts):
        return None
    return parts[0] - parts[1] - parts[2]


def untimed_problems(summary: dict, device_reference) -> list:
    """Startup is bounded: train.py's time off the clock (untimed_seconds) is at most
    UNTIMED_FACTOR times the reference run's on the same device plus UNTIMED_SLACK_S."""
    if summary.get("status") != "ok" or not device_reference:
        return []
    own, theirs = untimed_seconds(summary), untimed_seconds(device_reference)
    if own is None or theirs is None:
        return []  # a store's run from before launch.py measured train.py
    bound = UNTIMED_FACTOR * theirs + UNTIMED_SLACK_S
    if own <= bound:
        return []
    return [f"train.py ran {own:.1f} s off the training clock (startup, compilation, warm-up "
            f"steps, validation points), more than the bound of {bound:.1f} s ({UNTIMED_FACTOR:g} "
            f"x the {theirs:.1f} s of the reference run {device_reference.get('run_id')} on this "
            f"device + {UNTIMED_SLACK_S:g} s): that is time to train before the clock starts; "
            f"move the work into the timed loop (or out of train.py) and train again"]


def evaluator_problems(summary: dict) -> list:
    """A finished run's val_bpb is the number of launch.py's evaluator (harness/evaluation.py), a
    process train.py never ran in."""
    if summary.get("status") == "ok" and not isinstance(summary.get("evaluator"), dict):
        return [f"val_bpb was not computed by launch.py's evaluator (train.py ran on its own, or "
                f"its summary was rewritten): train with `{contract.TRAIN_COMMAND}`"]
    return []


def _no_final_evaluation(missing: str) -> list:
    """The problem of a summary that lacks what the harness's final evaluation records
    (`missing`): its val_bpb is not the harness's own."""
    return [f"the summary has no {missing}: the final val_bpb was not the harness's own "
            f"evaluation (train.py must end with run.finish); restore that ending of train.py"]


def runtime_harness_problems(summary: dict) -> list:
    """At the final evaluation the harness found its own functions and classes as imported
    (selfcheck.harness_check)."""
    check = summary.get("harness_check")
    if not isinstance(check, dict):
        return _no_final_evaluation("harness_check")
    if check.get("ok") is not True:
        names = ", ".join(check.get("changed") or ["?"])
        return [f"train.py changed the harness at run time ({names}): {RESTORE_HINT}, also from "
                f"train.py; remove what rebinds or replaces them and train again"]
    return []


def harness_clock_problems(summary: dict, records: list) -> list:
    """The run's training clock agrees with the harness's own wall clock. Between the line of the
    first timed step and the last line the harness's clock advanced by the steps in between plus
    the evaluations it timed itself; a step time that train.py under-reports (compute moved off the
    clock) shows here."""
    if summary.get("status") != "ok" or not records:
        return []
    warmup = contract.warmup_steps(summary)
    timed = stats.timed_steps(records, warmup)
    if any(not contract.finite_number(r.get(key))
           for r in timed for key in contract.HARNESS_STEP_KEYS):
        return ["metrics.jsonl lacks the harness's clock stamps (harness/wall_s, harness/eval_s): "
                "it was not written by run.log_step; log through it and train again"]
    if len(timed) < 2:
        return []
    first, last = timed[0], timed[-1]
    seen = ((last[contract.WALL_S] - first[contract.WALL_S])
            - (last[contract.EVAL_S] - first[contract.EVAL_S]))
    # the run's clock over the same span (steps may be unlogged)
    claimed = last[contract.TIME_S] - first[contract.TIME_S]
    if (not contract.finite_number(claimed)
            or abs(seen - claimed) > HARNESS_CLOCK_REL_TOLERANCE * seen + CLOCK_ABS_TOLERANCE_S):
        return [f"the run's step times add up to {claimed:.1f} s from step "
                f"{first[contract.STEP] + 1} on, but the harness's clock saw {seen:.1f} s of "
                f"training in that span (evaluations excluded): compute ran off the training "
                f"clock; restore the timing code of train.py and train again"]
    return []


def causality_problems(summary: dict) -> list:
    """The evaluator probed the model (harness/evaluation.py, probe batches): its logits at
    earlier positions must not move when only later tokens change, or the model reads the
    future."""
    probe = summary.get("causality")
    if not isinstance(probe, dict):
        return _no_final_evaluation("causality probe")
    if probe.get("ok") is not True:
        return [f"the logits at positions <= {probe.get('positions')} changed by "
                f"{probe.get('max_change')} when only later tokens changed (probe batches mixed "
                f"among the evaluation's): the model reads the "
                f"future (the targets), so its val_bpb is no language model's; remove what lets a "
                f"position see later tokens"]
    return []
