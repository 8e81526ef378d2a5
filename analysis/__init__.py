"""
The internals of analyze.py, one topic per module (fixed harness: the agent must not edit them).

    store.py        the experiment store: the ledger, results.tsv, the archive folders, the lock
    runfiles.py     the files a training run leaves behind, read defensively, and whose they are
    archive.py      one run after it ended: archived, checked, analysed, judged, then recorded
    bookkeeping.py  keep, discard, sync and claim: git and the ledger under the store's lock
    worker.py       which worker a command acts for (its variable, else its worktree)
    claims.py       which worker of a night is testing which idea of ideas_queue.md
    stats.py        trajectory statistics as pure functions over numpy arrays
    verdict.py      the noise estimate and the keep / rerun / discard / crash decision (pure)
    integrity.py    metric integrity: harness, tokenizer and val data unchanged, training clock
                    consistent
    plots.py        per-run figures and progress.png, driven from one list of series
    report.py       analysis.md, the `status` and `compare` texts, the Current Best block
    html_report.py  the morning report, report.html (templates/report.html.j2)
    nights.py       the store's nights: which rows make each, a line of numbers per night

The few git operations the bookkeeping commands need are harness/git.py's. Nothing here imports
torch: analysing a run must stay cheap next to a 5-minute training run.
"""
