"""
The internals of analyze.py, one topic per module (fixed harness: the agent must not edit them).

    store.py    the experiment store: reading a run's files, the ledger, archives, the lock
    stats.py    trajectory statistics as pure functions over numpy arrays
    verdict.py  the noise estimate and the keep / rerun / discard / crash decision (pure)
    integrity.py  metric integrity: harness, tokenizer and val data unchanged, training clock
                  consistent
    plots.py    per-run figures and progress.png, driven from one list of series
    report.py   analysis.md, the `status` and `compare` texts, the Current Best block
    git.py   the few git operations the bookkeeping commands need

Nothing here imports torch: analysing a run must stay cheap next to a 5-minute training run.
"""
