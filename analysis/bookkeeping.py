"""
The bookkeeping commands: keep, discard, sync and claim act on this worker's latest run (or a named
one) through git and the ledger, under the store's lock, after the repairs and the safety checks;
and what the night does with a run the agent left undecided (settle_command). Each appends the
lines analyze.py prints to `lines`, so that a note written before a refusal is still shown.
keep and discard read every input before their first write and write the ledger last: one that
fails leaves the ledger as it was, and running it again finishes it.
"""

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from harness import contract, git, settings
from harness.contract import HarnessError
from analysis import archive, claims, plots, report, verdict
from analysis.store import INSIGHTS, PROGRESS_PNG, Store, worker_of
from analysis.worker import current as this_worker

UNDECIDED = ("pending", "rerun")  # a finished run whose keep or discard is still to come


def own_runs(ledger: list, worker: str = None) -> list:
    """The ledger rows of one worker (default: this process's): with several workers, "the latest
    run" of keep, discard and sync is this worker's, not the store's."""
    worker = worker or this_worker()
    return [r for r in ledger if worker_of(r) == worker]


@contextmanager
def bookkeeping(run_id, lines: list):
    """(store, ledger, target run) under the store lock, after the repairs and the safety checks:
    a git state a commit must not happen in, or changes other than train.py, is refused before
    anything is written."""
    store = Store(".")
    git.require_repo()
    with store.lock():
        lines += archive.repair(store)
        git.refuse_unsafe_state()
        git.refuse_unsafe_tree()
        ledger = store.read_ledger()
        if not ledger:
            raise HarnessError("no run to act on: the store is empty (run `uv run analyze.py` "
                               "after a training run)")
        own = own_runs(ledger)
        if not (run_id or own or this_worker() == settings.MAIN_WORKER):
            raise HarnessError(f"worker {this_worker()} has no run yet to act on (the store's "
                               f"latest is {worker_of(ledger[-1])}'s): analyze a run of this "
                               f"worktree first, or name the run (`uv run analyze.py status`)")
        yield store, ledger, (store.find(ledger, run_id) if run_id else (own or ledger)[-1])


def save_ledger(store: Store, ledger: list, lines: list):
    """The command's last write (the progress plot is drawn from it: where that write fails, a
    note, for the ledger is written and the next command draws it)."""
    store.write_ledger(ledger)
    failure = plots.render_noting([(store.path(PROGRESS_PNG), plots.progress_figure, (ledger,))])
    if failure:  # the last progress.png is stale: removed, so that the next command draws it
        store.path(PROGRESS_PNG).unlink(missing_ok=True)
        lines.append(f"note: {failure}; free space there: the next `uv run analyze.py` (or keep, "
                     f"discard) draws it")


def refuse_keep(target: dict, ledger: list, new_baseline: bool):
    """Why `target` cannot be kept, as a HarnessError: invalid, failed, not committed, not
    reproducible from its commit, or a silent new baseline."""
    run_id = target["run_id"]
    if target["status"] == "invalid":
        raise HarnessError(f"run {run_id} is invalid and can never be kept: "
                           f"{(target.get('integrity') or ['see its analysis.md'])[0]}")
    if target["status"] in verdict.NOT_COUNTED:
        raise HarnessError(f"run {run_id} has status {target['status']}: only a finished run can "
                           f"be kept")
    committed = git.show(target["commit"])
    if committed is None or contract.sha256_bytes(committed.encode()) != target["train_sha256"]:
        raise HarnessError(f"run {run_id} did not run a committed train.py (commit "
                           f"{target['commit']}): commit train.py, train again "
                           f"(`{contract.TRAIN_COMMAND}`) and keep that run")
    local = git.uncommitted_import(committed, target["commit"])
    if local:
        raise HarnessError(f"run {run_id}'s train.py imports {local[0]}, which {local[1]}: a kept "
                           f"run must be reproducible from its commit; commit {local[0]} (`git add "
                           f"{local[0]} && git commit`), train again (`{contract.TRAIN_COMMAND}`) "
                           f"and keep that run")
    kept = [r for r in ledger if r["status"] == "keep"]
    if kept and verdict.best_pool(ledger, verdict.comparable_key(target)) is None \
            and not new_baseline:
        raise HarnessError(f"run {run_id} is comparable with no kept run "
                           f"({'; '.join(verdict.pool_changes(target, kept[-1]))}): keeping it "
                           f"would start a new baseline; if that is meant: `uv run analyze.py keep "
                           f"--new-baseline {run_id}`")


def keep(lines: list, run_id=None, new_baseline: bool = False):
    """Mark a run's code keep (all its pooled runs) and rewrite insights.md's Current Best block."""
    with bookkeeping(run_id, lines) as (store, ledger, target):
        refuse_keep(target, ledger, new_baseline)
        ideas = claims.read(store)
        store.notes_folder()
        insights = store.path(INSIGHTS)
        old = insights.read_text() if insights.exists() else None
        comparable = verdict.comparable_key(target)
        group = verdict.pools(ledger, comparable)[verdict.code_key(target)]
        for record in group:
            record["status"] = "keep"
        best_key, best_records = verdict.best_pool(ledger, comparable)
        tested = finish_claim(store, ideas, target, "keep")
        contract.atomic_write(insights, report.with_current_best(old, best_records))
        save_ledger(store, ledger, lines)
    mean = np.mean([r["val_bpb"] for r in group])
    lines.append(f"kept {target['run_id']} (commit {target['commit']}): val_bpb {mean:.6f} pooled "
                 f"over {len(group)} run(s)")
    if target["verdict"] != "keep":
        lines.append(f"note: the verdict was {target['verdict']} ({target['verdict_reason']}); "
                     f"kept on your call")
    if best_key != verdict.code_key(target):
        lines.append(f"note: {best_records[-1]['run_id']} remains the best (lower pooled val_bpb); "
                     f"discard reverts to it")
    lines.append(f"updated {insights}")
    if tested:
        lines.append(f"idea marked tested: {tested['idea']}")


def finish_claim(store: Store, ideas: list, target: dict, outcome: str):
    """The idea this worker claimed (of `ideas`, claims.json as read) is decided by keeping or
    discarding `target` (under the lock)."""
    done_claims, done = claims.finish(ideas, this_worker(), target["run_id"], outcome)
    if done is not None:
        claims.write(store, done_claims)
    return done


def best_code(store: Store, best_run: dict, lines: list) -> str:
    """The best's train.py, checked against its train_sha256: its archived snapshot, else (with a
    note) its commit's; refused when neither is the code that ran."""
    wanted = best_run["train_sha256"]
    snapshot = store.run_path(best_run["run_id"]) / contract.TRAIN_PY
    text = snapshot.read_text() if snapshot.exists() else None
    if text is not None and contract.sha256_bytes(text.encode()) == wanted:
        return text
    state = "is missing" if text is None else "is not the code that ran (its sha256 differs)"
    committed = git.show(best_run["commit"])
    if committed is not None and contract.sha256_bytes(committed.encode()) == wanted:
        lines.append(f"note: the best's snapshot {snapshot} {state}; train.py is restored from "
                     f"commit {best_run['commit']}")
        return committed
    raise HarnessError(f"the best run {best_run['run_id']}'s train.py cannot be restored: its "
                       f"snapshot {snapshot} {state} and `git show {best_run['commit']}:train.py` "
                       f"is {'another' if committed else 'no'} file; restore the train.py with "
                       f"sha256 {wanted[:12]}... by hand and commit it")


def discard(lines: list, run_id=None):
    """Mark a run's undecided runs discard and restore train.py to the best with a new commit: git
    first, the ledger after, so that where git fails nothing is marked and discard again
    finishes."""
    with bookkeeping(run_id, lines) as (store, ledger, target):
        if target["status"] == "keep":
            raise HarnessError(f"run {target['run_id']} is kept; a kept run is never discarded")
        best = verdict.revert_target(ledger, target)
        if best is None:
            raise HarnessError("no best yet to revert to: keep a baseline first (`uv run "
                               "analyze.py keep`)")
        best_run = best[1][0]
        wanted = best_code(store, best_run, lines)
        ideas = claims.read(store)
        working, committed = Path(contract.TRAIN_PY), git.show("HEAD")
        current = working.read_text() if working.exists() else None
        if current not in (None, wanted, committed) \
                and contract.sha256_bytes(current.encode()) != target["train_sha256"]:
            keep_copy = store.run_path(target["run_id"]) / "train.py.uncommitted"
            contract.atomic_write(keep_copy, current)
            lines.append(f"saved uncommitted train.py edits to {keep_copy}")
        if current != wanted:
            contract.atomic_write(working, wanted)
        sha = (git.commit_train_py(f"revert to best {best_run['commit']}")
               if committed != wanted else None)
        for record in ledger:
            if verdict.code_key(record) == verdict.code_key(target) \
                    and record["status"] in UNDECIDED:
                record["status"] = "discard"
        tested = finish_claim(store, ideas, target, "discard")
        save_ledger(store, ledger, lines)
    lines.append(f"discarded {target['run_id']}; " +
                 (f"train.py is the best's ({best_run['commit']}), nothing to commit" if sha is None
                  else f"train.py restored to best {best_run['commit']} in commit {sha}"))
    if tested:
        lines.append(f"idea marked tested: {tested['idea']}")


def sync(lines: list):
    """Start the next experiment from the store's best (another worker may have kept a better one
    meanwhile): commit the best's train.py as "sync to best <commit>" where the working one differs;
    refused while this worker's latest run awaits its decision."""
    with bookkeeping(None, lines) as (store, ledger, _):
        best = verdict.best_pool(ledger, verdict.store_comparable(ledger))
        if best is None:
            raise HarnessError("no best yet to sync to: keep a baseline first (`uv run analyze.py "
                               "keep`)")
        best_run = best[1][0]
        wanted = best_code(store, best_run, lines)
        working = Path(contract.TRAIN_PY)
        if working.exists() and working.read_text() == wanted:
            lines.append(f"train.py is the best's (run {best_run['run_id']}, commit "
                         f"{best_run['commit']}); nothing to do")
            return
        own = own_runs(ledger)
        if own and own[-1]["status"] in UNDECIDED:
            raise HarnessError(f"run {own[-1]['run_id']} awaits its decision "
                               f"({own[-1]['status']}): follow its verdict (keep, discard or "
                               f"rerun) before starting from the best")
        if git.changed_paths():
            raise HarnessError("train.py has uncommitted changes: commit and run them, or `git "
                               "checkout train.py`, before starting from the best")
        contract.atomic_write(working, wanted)
        sha = git.commit_train_py(f"sync to best {best_run['commit']}")
    lines.append(f"train.py synced to the best (run {best_run['run_id']}, commit "
                 f"{best_run['commit']}) in commit {sha}")


def claim(lines: list, idea: str):
    """Claim an idea of ideas_queue.md for this worker, under the store lock: refused when it is
    tested already or another live worker is testing it."""
    store = Store(".")
    with store.lock():
        updated, notes = claims.take(claims.read(store), idea, this_worker(),
                                     settings.WORKER_LIFE, claims.alive_in(store))
        claims.write(store, updated)
    lines += ([f"note: {note}" for note in notes]
              + [f"claimed for {this_worker()}: {idea.strip()}"])


def settle_command(store: Store, worker: str, working: Path):
    """What the night does with this worker's latest run once its agent is gone, so that git,
    train.py and the ledger agree: ("keep" | "discard", run id), or (None, a note or None)."""
    ledger = store.read_ledger()
    own = own_runs(ledger, worker)
    if not own:
        return None, None
    last = own[-1]
    if last.get("status") == "pending" and last.get("verdict") == "keep":
        return "keep", last["run_id"]
    best = verdict.revert_target(ledger, last)
    if best is None:
        return None, None
    best_run = best[1][0]
    snapshot = store.run_path(best_run["run_id"]) / contract.TRAIN_PY
    not_best = (snapshot.exists() and working.exists()
                and working.read_text() != snapshot.read_text())
    if last.get("status") in UNDECIDED or (not_best and last.get("status") != "keep"):
        return "discard", last["run_id"]
    if not_best:
        return None, (f"train.py is not the best's ({best_run['run_id']}) after kept run "
                      f"{last['run_id']}: left as it is")
    return None, None
