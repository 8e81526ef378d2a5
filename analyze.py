"""
Post-run analysis and bookkeeping of the experiment store (fixed harness: the agent must not edit it).

    uv run analyze.py                 archive the run in the working directory, judge it, write analysis.md
    uv run analyze.py keep [RUN_ID]   mark the (latest) run keep; rewrite insights.md's Current Best block
    uv run analyze.py discard [RUN_ID]  mark it discard; restore train.py to the best with a new commit
    uv run analyze.py compare A B     two archived runs side by side
    uv run analyze.py status          current best, latest runs, noise estimate, counts
    uv run analyze.py report          the morning report: .auto-log-research/report.html (analysis/html_report.py)
    uv run analyze.py sync            start from the store's best (another worker may have kept a better one)
    uv run analyze.py claim "IDEA"    claim an idea of ideas_queue.md for this worker; `claims` lists them all

It reads what train.py leaves behind (run_summary.json, metrics.jsonl, run.log) and never reports a
number a run did not produce: a run without its own summary is a crash, whatever files are lying
around; a finished run whose harness, data or training clock does not check out
(analysis/integrity.py) is archived as invalid, never kept or counted. The statistics, the verdict,
the plots and the store live in the analysis/ package; this file is the command line and the order
of things. No torch import: analysis takes seconds.
"""

import argparse
import difflib
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import schema
from analysis import claims, gitops, integrity, plots, report, slurm, stats, verdict
from analysis.store import (COMPARE_DIR, IDEAS, INSIGHTS, PROGRESS_PNG, STAMP_FORMAT, Store, StoreError, atomic_write,
                            clean_summary, current_worker, failure_line, load_run, metrics_notes, parse_stamp,
                            refuse_running_train, sha256_bytes, traceback_tail, worker_of)

STATUS_LAST_N = 10            # runs listed by `analyze.py status`
LOG_CLOCK_SLACK_S = 2.0       # started_at has 1 s resolution; a run.log last written before that is not this run's


# ---------------------------------------------------------------------------
# What the run in the working directory is
# ---------------------------------------------------------------------------

def archived_as(ledger: list, kind: str, sha256, mtime_ns):
    """The run id whose archived `kind` file ("run_log", "metrics") was this one: the same sha256 and the
    same mtime (two SyntaxError runs leave identical logs, written at different times). A record from
    before mtimes were recorded matches on its sha256 alone."""
    if sha256 is None:
        return None
    return next((r["run_id"] for r in ledger if r.get(f"{kind}_sha256") == sha256
                 and r.get(f"{kind}_mtime_ns", mtime_ns) == mtime_ns), None)


def log_relation(log_file: dict, summary: dict) -> str:
    """Whose run.log this is, next to `summary`: "own" (it carries the summary's stamp line, which
    prepare.RunLogger prints first), "older" (last written before that run started: a run not captured
    with `> run.log`), or "later": written after that run started without its stamp, so by a later
    process that died before train.py's logger started (a SyntaxError, a kill during the imports) and
    wrote no summary of its own. A summary without a usable started_at is taken as the log's own."""
    stamp = summary.get("started_at")
    if not isinstance(stamp, str):
        return "own"
    start = parse_stamp(stamp)
    if start is not None and log_file["mtime"] < start - LOG_CLOCK_SLACK_S:
        return "older"
    stamped = any(line.rstrip().endswith(schema.log_stamp(stamp)) for line in log_file["head"].splitlines())
    return "own" if stamped else "later"


def classify(run: dict, ledger: list) -> dict:
    """Decide which of the files found belong to this run, and its status.

    Files already archived (matched by run.log / metrics.jsonl hash and mtime, or the summary's start time
    and code) are an earlier run's, and so is a summary whose stamp line a later run.log lacks: a new
    run.log next to an old summary means this run died before train.py's logger started, which is a
    crash, never the old number."""
    summary, records, log, log_file = run["summary"], run["records"], run["log"], run["log_file"]
    notes = []
    if summary is None and log is None and not records and run["summary_problem"] is None:
        raise StoreError(f"no run to analyze in {run['dir'].resolve()}: run `uv run train.py > run.log 2>&1` first")
    summary, summary_fixes = clean_summary(summary) if summary is not None else (None, [])
    log_of = archived_as(ledger, "run_log", log_file["sha256"], log_file["mtime_ns"]) if log_file else None
    metrics_of = archived_as(ledger, "metrics", run["metrics_sha256"], run["metrics_mtime_ns"]) if records else None
    summary_of = None
    if summary is not None and summary.get("started_at"):  # the same file: workers start the same code in one second
        summary_of = next((r["run_id"] for r in ledger if r.get("started_at") == summary["started_at"]
                           and r.get("train_sha256") == summary.get("train_sha256")
                           and r.get("summary_sha256", run["summary_sha256"]) == run["summary_sha256"]), None)
    relation = log_relation(log_file, summary) if summary is not None and log_file else None
    if relation == "later" and not summary_of:
        notes.append(f"run_summary.json belongs to an earlier run (started at {summary['started_at']}) that was never "
                     f"analyzed: run.log was written after it and lacks its stamp line "
                     f"({schema.log_stamp(summary['started_at'])!r}), so this run failed before train.py's logger "
                     f"started; that earlier result, and its metrics.jsonl, are ignored")
        summary, records = None, []
    anything_new = ((log is not None and not log_of) or (summary is not None and not summary_of)
                    or (records and not metrics_of) or run["summary_problem"])
    if not anything_new:
        raise StoreError(f"this run is already archived as {log_of or summary_of or metrics_of}: train again "
                         f"(`uv run train.py > run.log 2>&1`) before analyzing")
    if summary_of:
        notes.append(f"run_summary.json belongs to run {summary_of} (already archived): this run wrote none, "
                     f"so it failed before train.py's logger started; that earlier result is ignored")
        summary = None
    if metrics_of:
        notes.append(f"metrics.jsonl belongs to run {metrics_of} (already archived); ignored")
        records = []
    elif run["metrics_problems"] and (summary or records):
        notes.extend(metrics_notes(run["metrics_problems"]))
    if log_of:
        notes.append(f"run.log belongs to run {log_of}, not to this run: capture it with "
                     f"`uv run train.py > run.log 2>&1`")
        log = None
    elif relation == "older" and summary is not None:
        notes.append("run.log was last written before this run started, so it is not this run's; "
                     "capture it with `uv run train.py > run.log 2>&1`")
        log = None
    if summary is not None:
        notes.extend(summary_fixes)

    error = None
    if summary is None:
        status = "crash"
        error = run["summary_problem"] or failure_line(log) or (
            "no run_summary.json: the process died without writing one (killed, out of memory, or it failed "
            "before train.py's logger started)" + (f"; run.log ends with: {log.strip().splitlines()[-1][:200]}"
                                                   if log and log.strip() else ""))
    elif summary.get("status") == "ok":
        status = "ok"
        if not verdict.finished({"val_bpb": summary.get("val_bpb")}):
            status, error = "crash", "run_summary.json says ok but has no finite val_bpb"
    elif summary.get("status") in verdict.FAILED_STATUSES:
        status, error = summary["status"], summary.get("error")
    else:
        status, error = "crash", f"run_summary.json has an unknown status {summary.get('status')!r}"
    ended = slurm.run_failure(log) if status != "ok" else None
    if ended:  # the scheduler ended the job (cancelled, pre-empted, out of time, never started): its words first
        status = ended[0] if status == "crash" else status
        error = ended[1] + (f"; train.py: {error}" if error and not error.startswith("no run_summary.json") else "")
    return {"summary": summary, "records": records, "log": log, "status": status, "error": error, "notes": notes}


def ran_code(run_dir: Path, summary) -> tuple:
    """(train.py text, exact) of the code that ran: the working copy or the commit's, whichever matches
    the summary's train_sha256; else the working copy, flagged as possibly not what ran."""
    candidates = []
    for folder in dict.fromkeys((run_dir, Path("."))):
        if (folder / gitops.TRAIN_PY).exists():
            candidates.append((folder / gitops.TRAIN_PY).read_text())
    committed = gitops.show((summary or {}).get("commit"))
    if committed is not None:
        candidates.append(committed)
    wanted = (summary or {}).get("train_sha256")
    for text in candidates:
        if wanted and sha256_bytes(text.encode()) == wanted:
            return text, True
    if not candidates:
        raise StoreError("no train.py in the working directory to archive")
    return candidates[0], wanted is None


def unified_diff(old: str, new: str, old_label: str, new_label: str) -> str:
    ensure = (lambda t: t if t.endswith("\n") else t + "\n")
    return "".join(difflib.unified_diff(ensure(old).splitlines(True), ensure(new).splitlines(True),
                                        fromfile=f"a/train.py ({old_label})", tofile=f"b/train.py ({new_label})"))


# ---------------------------------------------------------------------------
# Statistics of one run, against the best
# ---------------------------------------------------------------------------

def trajectory(records: list, config: dict, other_records: list = None) -> dict:
    warmup = int(config.get("CLOCK_WARMUP_STEPS", 0) or 0)
    timed = stats.timed_steps(records, warmup)
    steps, loss = stats.series(timed, schema.TRAIN_LOSS)
    out = {"n_records": len(records), "n_timed": len(timed), "warmup_steps": warmup,
           "tail": stats.tail_slope(steps, loss),
           "power_law": stats.fit_power_law(steps, loss),
           "spikes": stats.loss_spikes(*stats.series(records, schema.TRAIN_LOSS)),
           "val": stats.train_val_gap(records),
           "step_time": stats.step_time_stats(stats.series(timed, schema.STEP_TIME_MS)[1]),
           "layers": stats.layer_findings(stats.layer_table(records)),
           "agent": stats.agent_metrics(records)}
    tps = stats.series(timed, schema.TOKENS_PER_SEC)[1]
    out["tokens_per_sec"] = float(np.median(tps)) if len(tps) else None
    if other_records:
        out["divergence"] = stats.divergence(*stats.series(records, schema.TRAIN_LOSS),
                                             *stats.series(other_records, schema.TRAIN_LOSS))
    return out


def config_diff(a: dict, b: dict) -> list:
    """[(key, value in a, value in b)] over the union of captured keys, where they differ."""
    missing = "(absent)"
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def best_and_noise(record: dict, ledger: list) -> tuple:
    """(best records or None, noise estimate) for a new ledger record, from the runs comparable with it.

    The best's pool includes the new run when it repeats the best's code."""
    comparable = verdict.comparable_key(record)
    groups = verdict.pools(ledger + [record], comparable)
    noise = verdict.noise_estimate([[r["val_bpb"] for r in g] for g in groups.values()])
    best = verdict.best_pool(ledger, comparable)
    return (groups[best[0]] if best else None), noise


def verdict_mode() -> str:
    """The verdict policy of this call ($AUTORESEARCH_VERDICT, verdict.VERDICT_MODE by default)."""
    try:
        return verdict.verdict_mode(os.environ)
    except ValueError as e:
        raise StoreError(str(e)) from None


def judge(record: dict, ledger: list, best_records, noise: dict, mode: str) -> dict:
    if record["status"] in verdict.NOT_COUNTED:
        return verdict.decide([], failed=record["status"], error=record.get("error"))
    twin = verdict.same_seed_run(ledger, record)
    if twin:
        return {**verdict.decide([], repeats_seed_of=twin["run_id"]), "next_seed": verdict.next_seed(ledger, record)}
    candidate = verdict.pools(ledger + [record], verdict.comparable_key(record))[verdict.code_key(record)]
    same = bool(best_records) and verdict.code_key(best_records[0]) == verdict.code_key(record)
    kept = [r for r in ledger if r["status"] == "keep"]
    changes = verdict.pool_changes(record, kept[-1]) if kept and not best_records else None
    decision = verdict.decide([r["val_bpb"] for r in candidate],
                              [r["val_bpb"] for r in best_records] if best_records else None, noise,
                              same_as_best=same, new_pool=changes, policy=verdict.POLICIES[mode])
    return {**decision, "next_seed": verdict.next_seed(ledger, record)}


def run_commit(facts: dict):
    """The commit the run ran at: its summary's, else HEAD's."""
    return (facts["summary"] or {}).get("commit") or gitops.head()


def archive(store: Store, args, run: dict, facts: dict, run_id: str) -> dict:
    """Copy this run's own files into its (fresh) archive folder; return its ledger record (no verdict yet).
    run.log is archived bounded: a huge log keeps its head and tail (store.read_log)."""
    summary = facts["summary"] or {}
    commit = run_commit(facts)
    code, exact = ran_code(Path(args.run_dir), facts["summary"])
    if not exact:
        facts["notes"].append("train.py changed since the run started: the archived snapshot may differ from what ran")
    folder = store.run_path(run_id)
    log_file = run["log_file"] if facts["log"] is not None else None
    for name, own in (("run_summary.json", facts["summary"] is not None), ("metrics.jsonl", bool(facts["records"]))):
        if own:
            shutil.copy2(Path(args.run_dir) / name, folder / name)
    if log_file:
        atomic_write(folder / "run.log", log_file["archived"], mode="wb")
    atomic_write(folder / gitops.TRAIN_PY, code)
    description = args.message or gitops.subject(commit) or "(no description)"
    if summary.get("dirty"):
        description += " (uncommitted changes)"
    record = {k: summary.get(k) for k in schema.SUMMARY_KEYS}
    record.update({k: v for k, v in summary.items() if k not in record})
    own_metrics = bool(facts["records"])
    record.update(run_id=run_id, commit=commit, train_status=summary.get("status"),
                  status="pending" if facts["status"] == "ok" else facts["status"],
                  description=description, error=facts["error"], notes=facts["notes"],
                  analyzed_at=time.strftime(STAMP_FORMAT), worker=current_worker()[0],
                  train_sha256=summary.get("train_sha256") or sha256_bytes(code.encode()),
                  run_log_sha256=log_file["sha256"] if log_file else None,
                  run_log_mtime_ns=log_file["mtime_ns"] if log_file else None,
                  summary_sha256=run["summary_sha256"] if facts["summary"] is not None else None,
                  metrics_sha256=run["metrics_sha256"] if own_metrics else None,
                  metrics_mtime_ns=run["metrics_mtime_ns"] if own_metrics else None)
    if facts["status"] != "ok":
        record["val_bpb"] = None  # never a number this run did not produce
    return record


def write_diff(store: Store, record: dict, base):
    """diff.patch: the archived train.py against the best's (or, with no best yet, the previous run's)."""
    folder = store.run_path(record["run_id"])
    code = (folder / gitops.TRAIN_PY).read_text()
    base_file = store.run_path(base[0]["run_id"]) / gitops.TRAIN_PY if base else None
    if base_file is None or not base_file.exists():
        atomic_write(folder / "diff.patch", "# nothing to compare against: no best and no previous run\n")
        return
    header = f"# train.py of run {record['run_id']} against {base[1]} {base[0]['run_id']}\n"
    atomic_write(folder / "diff.patch", header + unified_diff(base_file.read_text(), code, base[0]["run_id"],
                                                               record["run_id"]))


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

def repair(store: Store):
    """Repair what a killed earlier call left (call first under the store lock): the store's leftovers
    (Store.repair) and a stale .git/index.lock; one `note:` line each."""
    for note in store.repair() + [gitops.clear_stale_index_lock()]:
        if note:
            print(f"note: {note}")


def cmd_analyze(args) -> int:
    store = Store(".")
    mode = verdict_mode()
    refuse_running_train(args.run_dir)
    run = load_run(args.run_dir)
    with store.lock():
        repair(store)
        ledger = store.read_ledger()
        facts = classify(run, ledger)
        run_id = store.allocate_run_id(run_commit(facts))
        try:
            context = analyze_run(store, args, run, facts, ledger, run_id, mode)
        except OSError as e:  # a full disk, a file-size limit: the run is archived whole or not at all
            if store.recorded(run_id):  # runs.jsonl was replaced, results.tsv was not
                raise StoreError(f"run {run_id} is recorded in runs.jsonl, but writing {e.filename or 'results.tsv'} "
                                 f"failed ({e.strerror or e}): free space; the next analyze.py command rebuilds "
                                 f"results.tsv") from None
            shutil.rmtree(store.run_path(run_id), ignore_errors=True)
            raise StoreError(f"archiving run {run_id} failed writing {e.filename or 'a file'} ({e.strerror or e}): "
                             f"nothing was recorded; free space and run `uv run analyze.py` again") from None
    print("\n".join(report.stdout_lines(context, store.run_path(run_id) / "analysis.md")))
    return 0


def analyze_run(store: Store, args, run: dict, facts: dict, ledger: list, run_id: str, mode: str) -> dict:
    """Archive, judge (under the verdict policy `mode`) and record one run in its allocated folder `run_id`
    (under the store lock); returns
    the context stdout is printed from. The ledger row is written last: until then nothing is recorded."""
    record = archive(store, args, run, facts, run_id)
    if facts["status"] == "ok":
        # a number from a touched evaluation or clock is kept for reference, never counted
        reference = next((r for r in ledger if verdict.finished(r)), None)  # the store's first finished run
        problems = integrity.integrity_problems(facts["summary"], facts["records"], Path("."), schema.cache_dir(),
                                                reference, run_dir=Path(args.run_dir),
                                                metrics_sha256=run["metrics_sha256"])
        record["integrity"] = problems
        if problems:
            record["status"] = "invalid"
    folder = store.run_path(run_id)
    best_records, noise = best_and_noise(record, ledger)
    # the best's representative for overlays and diffs: its latest run other than this one
    best = next((r for r in reversed(best_records or []) if r["run_id"] != run_id), None)
    previous = ledger[-1] if ledger else None
    write_diff(store, record, (best, "the best") if best else (previous, "the previous run") if previous else None)

    # figures in a forked process while this one computes the statistics (analysis has a time budget)
    best_metrics = store.archived_records(best["run_id"]) if best else None
    overlay = [(f"this run {run_id}", facts["records"])]
    if best:
        overlay.append((f"best {best['run_id']}", best_metrics))
    if previous and previous is not best:
        overlay.append((f"previous {previous['run_id']}", store.archived_records(previous["run_id"])))
    figure_jobs = [(folder / name, builder, fargs) for name, builder, fargs in plots.run_figure_jobs(overlay)]
    figure_jobs.append((store.path(PROGRESS_PNG), plots.progress_figure, (ledger + [record],)))
    wait_for_plots = plots.render_in_background(figure_jobs)
    try:
        decision = judge(record, ledger, best_records, noise, mode)
        if decision["verdict"] == "rerun":
            record["status"] = "rerun"
        record.update(verdict=decision["verdict"], verdict_reason=decision["reason"],
                      delta_best=decision.get("delta"), delta_sigma=decision.get("delta_sigma"),
                      p_value=decision.get("p_value"), n_pooled=decision.get("n_candidate"),
                      verdict_mode=mode if "delta" in decision else None,
                      best_run_id=best["run_id"] if best else None, noise_sigma=noise["sigma"], noise_df=noise["df"])
        context = {"record": record, "decision": decision, "noise": noise, "best": best,
                   "best_records": best_records, "previous": previous,
                   "trajectory": trajectory(facts["records"], record.get("config") or {}, best_metrics),
                   "config_diff": config_diff(best.get("config") or {}, record.get("config") or {}) if best else None,
                   "traceback": traceback_tail(facts["log"]) if facts["status"] != "ok" and facts["log"] else None,
                   "plots": [path.name for path, _, _ in figure_jobs[:-1]]}
        atomic_write(folder / "analysis.md", report.analysis_md(context))
        store.write_ledger(ledger + [record])
    except BaseException:
        wait_for_plots(check=False)  # the drawing process must be done before its folder can be removed
        raise
    wait_for_plots()
    return context


@contextmanager
def bookkeeping(run_id):
    """(store, ledger, target run) under the store lock, for keep and discard, after the repairs and the
    safety checks: a git state a commit must not happen in, or changes other than train.py, is refused
    before anything is written."""
    store = Store(".")
    gitops.require_repo()
    with store.lock():
        repair(store)
        gitops.refuse_unsafe_state()
        gitops.refuse_unsafe_tree()
        ledger = store.read_ledger()
        if not ledger:
            raise StoreError("no run to act on: the store is empty (run `uv run analyze.py` after a training run)")
        own = own_runs(ledger, current_worker()[0])
        yield store, ledger, (store.find(ledger, run_id) if run_id else (own or ledger)[-1])


def own_runs(ledger: list, worker: str) -> list:
    """The ledger rows of one worker (rows from before workers were recorded are the single agent's): with
    several workers, "the latest run" of keep, discard and sync is this worker's, not the store's."""
    return [r for r in ledger if worker_of(r) == worker]


def save_ledger(store: Store, ledger: list):
    store.write_ledger(ledger)
    plots.render([(store.path(PROGRESS_PNG), plots.progress_figure, (ledger,))])


def cmd_keep(args) -> int:
    with bookkeeping(args.run_id) as (store, ledger, target):
        if target["status"] == "invalid":
            raise StoreError(f"run {target['run_id']} is invalid and can never be kept: "
                             f"{(target.get('integrity') or ['see its analysis.md'])[0]}")
        if target["status"] in verdict.NOT_COUNTED:
            raise StoreError(f"run {target['run_id']} has status {target['status']}: only a finished run can be kept")
        committed = gitops.show(target["commit"])
        if committed is None or sha256_bytes(committed.encode()) != target["train_sha256"]:
            raise StoreError(f"run {target['run_id']} did not run a committed train.py (commit {target['commit']}): "
                             f"commit train.py and run it again before keeping it")
        local = gitops.uncommitted_import(committed, target["commit"])
        if local:
            raise StoreError(f"run {target['run_id']}'s train.py imports {local[0]}, which {local[1]}: a kept run must be "
                             f"reproducible from its commit; commit {local[0]} (`git add {local[0]} && git commit`), "
                             f"run train.py again and keep that run")
        comparable = verdict.comparable_key(target)
        kept = [r for r in ledger if r["status"] == "keep"]
        if kept and verdict.best_pool(ledger, comparable) is None and not args.new_baseline:
            raise StoreError(f"run {target['run_id']} is comparable with no kept run "
                             f"({'; '.join(verdict.pool_changes(target, kept[-1]))}): keeping it would start a new "
                             f"baseline; if that is meant: `uv run analyze.py keep --new-baseline {target['run_id']}`")
        group = verdict.pools(ledger, comparable)[verdict.code_key(target)]
        for record in group:
            record["status"] = "keep"
        save_ledger(store, ledger)
        tested = finish_claim(store, target, "keep")
        best_key, best_records = verdict.best_pool(ledger, comparable)
        insights = store.path(INSIGHTS)
        old = insights.read_text() if insights.exists() else None
        atomic_write(insights, report.with_current_best(old, best_records))
    mean = np.mean([r["val_bpb"] for r in group])
    print(f"kept {target['run_id']} (commit {target['commit']}): val_bpb {mean:.6f} pooled over {len(group)} run(s)")
    if target["verdict"] != "keep":
        print(f"note: the verdict was {target['verdict']} ({target['verdict_reason']}); kept on your call")
    if best_key != verdict.code_key(target):
        print(f"note: {best_records[-1]['run_id']} remains the best (lower pooled val_bpb); discard reverts to it")
    print(f"updated {insights}")
    if tested:
        print(f"idea marked tested: {tested['idea']}")
    return 0


def finish_claim(store: Store, target: dict, outcome: str):
    """The idea this worker claimed is decided by keeping or discarding `target` (call under the lock)."""
    done_claims, done = claims.finish(claims.read(store), current_worker()[0], target["run_id"], outcome)
    if done is not None:
        claims.write(store, done_claims)
    return done


def best_code(store: Store, best_run: dict) -> str:
    """The best's train.py, checked against its train_sha256: its archived snapshot, else (with a note) its
    commit's; refused when neither is the code that ran."""
    wanted = best_run["train_sha256"]
    snapshot = store.run_path(best_run["run_id"]) / gitops.TRAIN_PY
    text = snapshot.read_text() if snapshot.exists() else None
    if text is not None and sha256_bytes(text.encode()) == wanted:
        return text
    state = "is missing" if text is None else "is not the code that ran (its sha256 differs)"
    committed = gitops.show(best_run["commit"])
    if committed is not None and sha256_bytes(committed.encode()) == wanted:
        print(f"note: the best's snapshot {snapshot} {state}; train.py is restored from commit {best_run['commit']}")
        return committed
    raise StoreError(f"the best run {best_run['run_id']}'s train.py cannot be restored: its snapshot {snapshot} {state} "
                     f"and `git show {best_run['commit']}:train.py` is {'another' if committed else 'no'} file; "
                     f"restore the train.py with sha256 {wanted[:12]}... by hand and commit it")


def cmd_discard(args) -> int:
    with bookkeeping(args.run_id) as (store, ledger, target):
        if target["status"] == "keep":
            raise StoreError(f"run {target['run_id']} is kept; a kept run is never discarded")
        best = verdict.revert_target(ledger, target)
        if best is None:
            raise StoreError("no best yet to revert to: keep a baseline first (`uv run analyze.py keep`)")
        best_run = best[1][0]
        wanted = best_code(store, best_run)
        # git first, the ledger after: where git fails, nothing is marked and running discard again finishes the job
        working, committed = Path(gitops.TRAIN_PY), gitops.show("HEAD")
        current = working.read_text() if working.exists() else None
        if current not in (None, wanted, committed) and sha256_bytes(current.encode()) != target["train_sha256"]:
            keep_copy = store.run_path(target["run_id"]) / "train.py.uncommitted"
            atomic_write(keep_copy, current)
            print(f"saved uncommitted train.py edits to {keep_copy}")
        if current != wanted:
            atomic_write(working, wanted)
        sha = gitops.commit_train_py(f"revert to best {best_run['commit']}") if committed != wanted else None
        for record in ledger:
            if verdict.code_key(record) == verdict.code_key(target) and record["status"] in ("pending", "rerun"):
                record["status"] = "discard"
        save_ledger(store, ledger)
        tested = finish_claim(store, target, "discard")
    if sha is None:
        print(f"discarded {target['run_id']}; train.py is the best's ({best_run['commit']}), nothing to commit")
    else:
        print(f"discarded {target['run_id']}; train.py restored to best {best_run['commit']} in commit {sha}")
    if tested:
        print(f"idea marked tested: {tested['idea']}")
    return 0


def cmd_sync(args) -> int:
    """Start the next experiment from the store's best: with several workers another one may have kept a
    better train.py meanwhile. Writes the best's train.py with a commit "sync to best <commit>" where the
    working one differs; refuses while this worker's latest run awaits its decision."""
    with bookkeeping(None) as (store, ledger, _):
        worker = current_worker()[0]
        best = verdict.best_pool(ledger, verdict.store_comparable(ledger))
        if best is None:
            raise StoreError("no best yet to sync to: keep a baseline first (`uv run analyze.py keep`)")
        best_run = best[1][0]
        wanted = best_code(store, best_run)
        working = Path(gitops.TRAIN_PY)
        if working.exists() and working.read_text() == wanted:
            print(f"train.py is the best's (run {best_run['run_id']}, commit {best_run['commit']}); nothing to do")
            return 0
        own = own_runs(ledger, worker)
        if own and own[-1]["status"] in ("pending", "rerun"):
            raise StoreError(f"run {own[-1]['run_id']} awaits its decision ({own[-1]['status']}): follow its verdict "
                             f"(keep, discard or rerun) before starting from the best")
        if gitops.changed_paths():
            raise StoreError("train.py has uncommitted changes: commit and run them, or `git checkout train.py`, "
                             "before starting from the best")
        atomic_write(working, wanted)
        sha = gitops.commit_train_py(f"sync to best {best_run['commit']}")
    print(f"train.py synced to the best (run {best_run['run_id']}, commit {best_run['commit']}) in commit {sha}")
    return 0


def cmd_claim(args) -> int:
    """Claim an idea of ideas_queue.md for this worker, under the store lock: refused (exit 1) when it is
    tested already or another live worker is testing it."""
    store = Store(".")
    worker, pid = current_worker()
    idea = " ".join(args.idea)
    with store.lock():
        updated, notes = claims.take(claims.read(store), idea, worker, pid)
        claims.write(store, updated)
    for note in notes:
        print(f"note: {note}")
    print(f"claimed for {worker}: {idea.strip()}")
    return 0


def cmd_claims(args) -> int:
    """Every idea of ideas_queue.md with its claim: free, claimed by a live worker, or tested."""
    store = Store(".")
    queue = store.path(IDEAS)
    print(claims.listing(claims.read(store), queue.read_text() if queue.exists() else ""))
    return 0


def cmd_compare(args) -> int:
    store = Store(".")
    ledger = store.read_ledger()
    a, b = store.find(ledger, args.a), store.find(ledger, args.b)
    ra, rb = store.archived_records(a["run_id"]), store.archived_records(b["run_id"])
    traj = trajectory(ra, a.get("config") or {}, rb)
    out_dir = store.path(COMPARE_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{a['run_id']}_vs_{b['run_id']}.png"
    plots.render([(path, plots.line_figure, (plots.PLOTS[0], [(a["run_id"], ra), (b["run_id"], rb)]))])
    print(report.compare_md(a, b, config_diff(b.get("config") or {}, a.get("config") or {}), traj, path))
    return 0


def cmd_status(args) -> int:
    store = Store(".")
    ledger = store.read_ledger()
    if not ledger:
        print("no runs yet: `uv run train.py > run.log 2>&1 && uv run analyze.py`")
        return 0
    comparable = verdict.store_comparable(ledger)
    groups = verdict.pools(ledger, comparable)
    noise = verdict.noise_estimate([[r["val_bpb"] for r in g] for g in groups.values()])
    best = verdict.best_pool(ledger, comparable)
    print(report.status_text(ledger, best[1] if best else None, noise, store.orphans(ledger), args.n, verdict_mode(),
                             [c for c in claims.read(store) if claims.is_live(c)]))
    return 0


def cmd_report(args) -> int:
    """Write report.html from the store as it is now. Reads only (no lock): the ledger and every archive
    file are replaced atomically, so a report written during an analysis shows the store before or after it."""
    from jinja2 import TemplateError

    from analysis import html_report  # jinja2 and markdown-it are imported by this command only
    store = Store(".")
    try:
        path = html_report.write(store)
    except TemplateError as e:  # a damaged analysis/templates/ (the harness's): one line, as every refusal
        raise StoreError(f"the report template {html_report.TEMPLATE_DIR / html_report.TEMPLATE} is broken "
                         f"({type(e).__name__}: {e}); restore it with `git checkout analysis/templates`") from None
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB, {len(store.read_ledger())} runs): "
          f"open file://{path.resolve()}")
    return 0


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (`status -n`)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


class OneLineErrors(argparse.ArgumentParser):
    """A usage error is one `error:` line, as every other refusal of analyze.py (exit 2, as argparse)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see `uv run {self.prog} --help`)\n")


def main(argv=None) -> int:
    parser = OneLineErrors(prog="analyze.py", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--run-dir", default=".", help="where train.py wrote its files (default: here)")
    parser.add_argument("-m", "--message", help="description for results.tsv (default: the commit's subject)")
    sub = parser.add_subparsers(dest="command")
    keep = sub.add_parser("keep", help="mark a run keep and update insights.md's Current Best")
    keep.add_argument("run_id", nargs="?", help="default: this worker's latest run")
    keep.add_argument("--new-baseline", action="store_true",
                      help="keep a run that no kept run is comparable with (new device, budget, harness or data)")
    discard = sub.add_parser("discard", help="mark a run discard and restore train.py to the best")
    discard.add_argument("run_id", nargs="?", help="default: this worker's latest run")
    compare = sub.add_parser("compare", help="two archived runs side by side")
    compare.add_argument("a")
    compare.add_argument("b")
    status = sub.add_parser("status", help="best, latest runs, noise, counts")
    status.add_argument("-n", type=positive_int, default=STATUS_LAST_N, help="how many latest runs to list")
    sub.add_parser("report", help="write the morning report .auto-log-research/report.html")
    sub.add_parser("sync", help="start from the store's best: commit its train.py where this one differs")
    claim = sub.add_parser("claim", help="claim an idea of ideas_queue.md for this worker (refused if taken or tested)")
    claim.add_argument("idea", nargs="+", help="the idea's line of ideas_queue.md")
    sub.add_parser("claims", help="the ideas of ideas_queue.md: free, claimed by a worker, or tested")
    args = parser.parse_args(argv)
    command = {None: cmd_analyze, "keep": cmd_keep, "discard": cmd_discard, "compare": cmd_compare,
               "status": cmd_status, "report": cmd_report, "sync": cmd_sync, "claim": cmd_claim,
               "claims": cmd_claims}[args.command]
    try:
        return command(args)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk or a permission, outside the archiving (cmd_analyze says more there)
        print(f"error: {e.filename or 'a file'}: {e.strerror or e}; fix that (free space, permissions) and run "
              f"the command again", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
