"""
One run, after it ended: its own files archived, its integrity checked, its trajectory analysed, its
verdict decided against the best with the noise estimate, analysis.md and the figures written, and
its ledger row recorded last (until then nothing is recorded). `analyze.py` with no command.
"""

import re
import shutil
from pathlib import Path

import numpy as np

from harness import contract, git, settings
from harness.contract import HarnessError
from analysis import integrity, pairing, plots, report, runfiles, stats, verdict
from analysis.store import PROGRESS_PNG, Store
from analysis.worker import current as this_worker

NO_BASE = "# nothing to compare against: no best and no previous run\n"
PLOT_LINK = re.compile(r"^- \[([\w.-]+\.png)\]\(\1\)$", re.M)  # a figure analysis.md lists


def trajectory(records: list, config: dict, other_records: list = None) -> dict:
    """The statistics analysis.md reports of one run's steps (and its divergence from another's)."""
    warmup = contract.warmup_steps({"config": config})
    timed = stats.timed_steps(records, warmup)
    steps, loss = stats.series(timed, contract.TRAIN_LOSS)
    out = {"n_records": len(records), "n_timed": len(timed), "warmup_steps": warmup,
           "tail": stats.tail_slope(steps, loss),
           "power_law": stats.fit_power_law(steps, loss),
           "spikes": stats.loss_spikes(*stats.series(records, contract.TRAIN_LOSS)),
           "val": stats.train_val_gap(records),
           "step_time": stats.step_time_stats(stats.series(timed, contract.STEP_TIME_MS)[1]),
           "layers": stats.layer_findings(stats.layer_table(records)),
           "agent": stats.agent_metrics(records)}
    tps = stats.series(timed, contract.TOKENS_PER_SEC)[1]
    out["tokens_per_sec"] = float(np.median(tps)) if len(tps) else None
    if other_records:
        out["divergence"] = stats.divergence(*stats.series(records, contract.TRAIN_LOSS),
                                             *stats.series(other_records, contract.TRAIN_LOSS))
    return out


def config_diff(a: dict, b: dict) -> list:
    """[(key, value in a, value in b)] over the union of captured keys, where they differ."""
    missing = "(absent)"
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


def best_and_noise(record: dict, ledger: list) -> tuple:
    """(best records or None, noise estimate) for a new ledger record, from the runs comparable
    with it. The best's pool includes the new run when it repeats the best's code."""
    comparable = verdict.comparable_key(record)
    groups = verdict.pools(ledger + [record], comparable)
    noise = verdict.noise_estimate([[r["val_bpb"] for r in g] for g in groups.values()])
    best = verdict.best_pool(ledger, comparable)
    return (groups[best[0]] if best else None), noise


def judge(record: dict, ledger: list, best_records, noise: dict, mode: str) -> dict:
    """The verdict of a new run under the keep policy `mode`, with the seed of its next repeat."""
    if record["status"] in verdict.NOT_COUNTED:
        return verdict.decide([], failed=record["status"], error=record.get("error"))
    twin = verdict.same_seed_run(ledger, record)
    if twin:
        return {**verdict.decide([], repeats_seed_of=twin["run_id"]),
                "next_seed": verdict.next_seed(ledger, record)}
    groups = verdict.pools(ledger + [record], verdict.comparable_key(record))
    candidate = groups[verdict.code_key(record)]
    same = bool(best_records) and verdict.code_key(best_records[0]) == verdict.code_key(record)
    kept = [r for r in ledger if r["status"] == "keep"]
    changes = verdict.pool_changes(record, kept[-1]) if kept and not best_records else None
    share = pairing.store_share(groups, verdict.code_key(best_records[0]) if best_records else None,
                                noise.get("sigma"))
    decision = verdict.decide([r["val_bpb"] for r in candidate],
                              [r["val_bpb"] for r in best_records] if best_records else None, noise,
                              same_as_best=same, new_pool=changes, policy=verdict.POLICIES[mode],
                              shared_seeds=pairing.shared_seeds(candidate, best_records or []),
                              rho=share["rho"])
    return {**decision, "next_seed": verdict.next_seed(ledger, record)}


def run_commit(facts: dict):
    """The commit the run ran at: its summary's, else HEAD's."""
    return (facts["summary"] or {}).get("commit") or git.head()


def night_id(store: Store):
    """The supervised night this run is analysed in: the start stamp its supervisor wrote into
    night.json (the same for every worker of the night), or None (a run analysed by hand, with no
    night running on the store). The morning report groups runs into nights by it."""
    night = store.night()
    started = night.get("started_at") if night else None
    return started if isinstance(started, str) and started else None


def archive_files(store: Store, run: dict, facts: dict, run_id: str, message=None) -> dict:
    """Copy this run's own files into its (fresh) archive folder; return its ledger record (no
    verdict yet). run.log is archived bounded: a huge log keeps its head and tail."""
    summary, run_dir = facts["summary"] or {}, Path(run["dir"])
    commit = run_commit(facts)
    code, exact = runfiles.ran_code(run_dir, facts["summary"])
    if not exact:
        facts["notes"].append("train.py changed since the run started: the archived snapshot may "
                              "differ from what ran")
    folder = store.run_path(run_id)
    log_file = run["log_file"] if facts["log"] is not None else None
    own_metrics = bool(facts["records"])
    for name, own in ((contract.RUN_SUMMARY, facts["summary"] is not None),
                      (contract.RUN_METRICS, own_metrics)):
        if own:
            shutil.copy2(run_dir / name, folder / name)
    if log_file:
        contract.atomic_write(folder / contract.RUN_LOG, log_file["archived"], mode="wb")
    contract.atomic_write(folder / contract.TRAIN_PY, code)
    description = message or git.subject(commit) or "(no description)"
    if summary.get("dirty"):
        description += " (uncommitted changes)"
    record = {k: summary.get(k) for k in contract.SUMMARY_KEYS}
    record.update({k: v for k, v in summary.items() if k not in record})
    record.update(run_id=run_id, commit=commit, train_status=summary.get("status"),
                  status="pending" if facts["status"] == "ok" else facts["status"],
                  description=description, error=facts["error"], notes=facts["notes"],
                  analyzed_at=contract.stamp(), worker=this_worker(), night=night_id(store),
                  agent=settings.AGENT,
                  train_sha256=summary.get("train_sha256") or contract.sha256_bytes(code.encode()),
                  run_log_sha256=log_file["sha256"] if log_file else None,
                  run_log_mtime_ns=log_file["mtime_ns"] if log_file else None,
                  summary_sha256=run["summary_sha256"] if facts["summary"] is not None else None,
                  metrics_sha256=run["metrics_sha256"] if own_metrics else None,
                  metrics_mtime_ns=run["metrics_mtime_ns"] if own_metrics else None)
    if facts["status"] != "ok":
        record["val_bpb"] = None  # never a number this run did not produce
    return record


def write_diff(store: Store, record: dict, base):
    """diff.patch: the archived train.py against the best's (with no best yet, the previous
    run's)."""
    folder = store.run_path(record["run_id"])
    code = (folder / contract.TRAIN_PY).read_text()
    base_file = store.run_path(base[0]["run_id"]) / contract.TRAIN_PY if base else None
    if base_file is None or not base_file.exists():
        contract.atomic_write(folder / "diff.patch", NO_BASE)
        return
    header = f"# train.py of run {record['run_id']} against {base[1]} {base[0]['run_id']}\n"
    diff = runfiles.unified_diff(base_file.read_text(), code, base[0]["run_id"], record["run_id"])
    contract.atomic_write(folder / "diff.patch", header + diff)


def repair(store: Store) -> list:
    """Repair what a killed or failed earlier call left (call first under the store lock): the
    store's leftovers, a stale .git/index.lock, the figures a full disk left undrawn; one `note:`
    line each."""
    notes = store.repair() + [git.clear_stale_index_lock()] + redraw_missing(store)
    return [f"note: {note}" for note in notes if note]


def redraw_missing(store: Store) -> list:
    """Draw the figures of archived runs that their analysis.md lists but a failed write (a full
    disk) left missing, overlaid as they were first drawn (with the run's best and the run before
    it), and a missing progress.png; one note, or where a write fails again, one note saying
    so."""
    ledger = store.read_ledger()
    jobs, drawn = [], []
    for i, record in enumerate(ledger):
        folder = store.run_path(record["run_id"])
        listed = folder / "analysis.md"
        listed = PLOT_LINK.findall(listed.read_text()) if listed.exists() else []
        missing = [name for name in listed if not (folder / name).exists()]
        if not missing:
            continue
        best = next((r for r in ledger if r["run_id"] == record.get("best_run_id")), None)
        facts = {"records": store.archived_records(record["run_id"])}
        run_jobs = figure_jobs(store, record, facts, ledger[:i], best,
                               store.archived_records(best["run_id"]) if best else None)[:-1]
        jobs += [job for job in run_jobs if job[0].name in missing]
        drawn.append(record["run_id"])
    if ledger and not store.path(PROGRESS_PNG).exists():
        jobs.append((store.path(PROGRESS_PNG), plots.progress_figure, (ledger,)))
        drawn.append(PROGRESS_PNG)
    if not jobs:
        return []
    try:
        failure = plots.render_noting(jobs)
    except Exception as e:  # a drawing bug must not stop every later command: said, not raised
        failure = f"drawing failed ({type(e).__name__}: {e})"
    if failure:
        return [f"figures of {', '.join(drawn)} are still missing: {failure}; free space there "
                f"and run the command again"]
    return [f"drew the missing figures of {', '.join(drawn)} ({len(jobs)} file(s)), left "
            f"undrawn by a failed write"]


def analyze(store: Store, run_dir, mode: str, notes: list, message=None) -> tuple:
    """Archive, judge and record the run in `run_dir` (`analyze.py`): (the context stdout is printed
    from, the path of its analysis.md); the repairs' notes go to `notes` first, so that they show
    even before a refusal. A full disk records all of it or nothing."""
    runfiles.refuse_running_train(run_dir)
    run = runfiles.load_run(run_dir)
    with store.lock():
        notes += repair(store)
        ledger = store.read_ledger()
        facts = runfiles.classify(run, ledger)
        run_id = store.allocate_run_id(run_commit(facts))
        try:
            context = analyze_run(store, run, facts, ledger, run_id, mode, message)
        except OSError as e:  # a full disk, a file-size limit: archived whole or not at all
            what = e.filename or "a file"
            if store.recorded(run_id):  # runs.jsonl was replaced, results.tsv was not
                raise HarnessError(f"run {run_id} is recorded in runs.jsonl, but writing "
                                   f"{e.filename or 'results.tsv'} failed ({e.strerror or e}): "
                                   f"free space; the next analyze.py command rebuilds "
                                   f"results.tsv") from None
            shutil.rmtree(store.run_path(run_id), ignore_errors=True)
            raise HarnessError(f"archiving run {run_id} failed writing {what} ({e.strerror or e}): "
                               f"nothing was recorded; free space and run `uv run analyze.py` again"
                               ) from None
        if context["plots_failed"]:  # a stale progress.png is removed: the next call draws it
            store.path(PROGRESS_PNG).unlink(missing_ok=True)
            notes.append(f"note: run {run_id} is recorded, but not all its figures: "
                         f"{context['plots_failed']}; free space there: the next `uv run "
                         f"analyze.py` (or keep, discard) draws them")
    return context, store.run_path(run_id) / "analysis.md"


def check_integrity(record: dict, run: dict, facts: dict, ledger: list):
    """A finished run's number from a touched evaluation, data or clock is kept for reference,
    never counted: the record becomes `invalid` with its problems."""
    if facts["status"] != "ok":
        return
    summary = facts["summary"]
    reference = next((r for r in ledger if verdict.finished(r)), None)  # the store's first finished
    device_reference = next((r for r in ledger if verdict.finished(r)
                             and r.get("device") == summary.get("device")), None)
    problems = integrity.integrity_problems(summary, facts["records"], Path("."),
                                            settings.CACHE_DIR, reference, run_dir=Path(run["dir"]),
                                            metrics_sha256=run["metrics_sha256"],
                                            device_reference=device_reference)
    record["integrity"] = problems
    if problems:
        record["status"] = "invalid"


def figure_jobs(store: Store, record: dict, facts: dict, ledger: list, best, best_metrics) -> list:
    """The run's figures (overlaid with the best's and the previous run's) and progress.png."""
    previous = ledger[-1] if ledger else None
    overlay = [(f"this run {record['run_id']}", facts["records"])]
    if best:
        overlay.append((f"best {best['run_id']}", best_metrics))
    if previous and previous is not best:
        overlay.append((f"previous {previous['run_id']}",
                        store.archived_records(previous["run_id"])))
    folder = store.run_path(record["run_id"])
    jobs = [(folder / name, builder, fargs)
            for name, builder, fargs in plots.run_figure_jobs(overlay)]
    return jobs + [(store.path(PROGRESS_PNG), plots.progress_figure, (ledger + [record],))]


def analyze_run(store: Store, run: dict, facts: dict, ledger: list, run_id: str, mode: str,
                message=None) -> dict:
    """Archive, judge (under the keep policy `mode`) and record one run in its allocated folder
    (under the store lock); the context stdout is printed from. The ledger row is written last."""
    record = archive_files(store, run, facts, run_id, message)
    check_integrity(record, run, facts, ledger)
    best_records, noise = best_and_noise(record, ledger)
    # the best's representative for overlays and diffs: its latest run other than this one
    best = next((r for r in reversed(best_records or []) if r["run_id"] != run_id), None)
    previous = ledger[-1] if ledger else None
    write_diff(store, record, (best, "the best") if best else
               (previous, "the previous run") if previous else None)
    best_metrics = store.archived_records(best["run_id"]) if best else None
    jobs = figure_jobs(store, record, facts, ledger, best, best_metrics)
    wait_for_plots = plots.render_in_background(jobs)  # drawn while the statistics are computed
    try:
        decision = judge(record, ledger, best_records, noise, mode)
        if decision["verdict"] == "rerun":
            record["status"] = "rerun"
        record.update(verdict=decision["verdict"], verdict_reason=decision["reason"],
                      delta_best=decision.get("delta"), delta_sigma=decision.get("delta_sigma"),
                      p_value=decision.get("p_value"), n_pooled=decision.get("n_candidate"),
                      verdict_mode=mode if "delta" in decision else None,
                      best_run_id=best["run_id"] if best else None, noise_sigma=noise["sigma"],
                      noise_df=noise["df"])
        context = {"record": record, "decision": decision, "noise": noise, "best": best,
                   "best_records": best_records, "previous": previous,
                   "trajectory": trajectory(facts["records"], record.get("config") or {},
                                            best_metrics),
                   "config_diff": (config_diff(best.get("config") or {}, record.get("config") or {})
                                   if best else None),
                   "traceback": (runfiles.traceback_tail(facts["log"])
                                 if facts["status"] != "ok" and facts["log"] else None),
                   "plots": [path.name for path, _, _ in jobs[:-1]]}
        contract.atomic_write(store.run_path(run_id) / "analysis.md", report.analysis_md(context))
        store.write_ledger(ledger + [record])
    except BaseException:
        wait_for_plots(check=False)  # the drawing process must be done before its folder is removed
        raise
    context["plots_failed"] = wait_for_plots()
    return context
