"""
The nights of a store, for the morning report (analysis/html_report.py): which rows of the ledger
make each night (NIGHTS), a line of numbers per night, the best after every row, and which kept
changes the page of one night shows in full. All of it from the ledger alone: no file is read but
one stat per night (its page), so it costs milliseconds for 10,000 rows.
"""

import time
from collections import Counter
from datetime import datetime

from harness.contract import HarnessError
from analysis import verdict
from analysis.store import Store, worker_of


NIGHTS = """
What a night is. The ledger's rows, in order, are cut into nights, and each row belongs to one:
a row starts a new night when it records a supervised night (its `night`: the start stamp of the
night.json its supervisor wrote, recorded by analyze.py since the store knew nights) other than
the one the current night records, or when more than NIGHT_GAP_S passed since the previous row was
analysed. A row without a night (a run analysed by hand, or a store from before) starts no night
by itself: it joins the night it follows unless the gap ends it, so runs made by hand before a
night are a night of their own, and a repeat made by hand in the morning joins the night it
checks. Nights are numbered from 1, the store's first; rows are only ever appended, so a night's
number never changes.
"""
# longer than any pause inside a night (a run and its analysis take minutes, a Slurm job waits at
# most AUTORESEARCH_SLURM_PENDING_S, 10 min by default), shorter than the day between two nights
NIGHT_GAP_S = 3 * 3600
# `analyze.py report --night N` writes this, beside report.html
NIGHT_PAGE = "report-night-{n}.html"


def stamp_seconds(text):
    """contract.parse_stamp's answer for a stamp of contract.STAMP_FORMAT, about 40 times faster
    (a 10,000-row ledger has 10,000 of them): epoch seconds, or None (not a string, not a time,
    or a time without its UTC offset)."""
    try:
        when = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return when.timestamp() if when.tzinfo is not None else None


def row_time(record: dict):
    """When a row was recorded (its analysis, else its run's start), epoch seconds or None."""
    return stamp_seconds(record.get("analyzed_at")) or stamp_seconds(record.get("started_at"))


def night_spans(ledger: list, times=None) -> list:
    """[(first, end)] row indices (0-based, end excluded) of the ledger's nights, in order (the
    rule: NIGHTS); `times`: row_time of every row, when the caller has them. One pass over the
    rows; no file is read."""
    times = times if times is not None else [row_time(r) for r in ledger]
    spans, start, current, last_time = [], 0, None, None
    for i, record in enumerate(ledger):
        night, when = record.get("night"), times[i]
        gap = when is not None and last_time is not None and when - last_time > NIGHT_GAP_S
        if i and (gap or (night is not None and night != current)):
            spans.append((start, i))
            start, current = i, None
        current = night if night is not None else current
        last_time = when if when is not None else last_time
    if ledger:
        spans.append((start, len(ledger)))
    return spans


def running_best(ledger: list, comparable) -> list:
    """The best's pooled mean after each row (None before the first kept run of the best's pool):
    the lowest mean of the kept codes, pooled as verdict.pools does, as their runs arrived. Each
    kept run updates its code's sum and count, so a long store costs one pass plus a min over the
    kept codes per kept run."""
    out, sums, seen, running = [], {}, set(), None
    for record in ledger:
        if record.get("status") == "keep" and verdict.finished(record) \
                and verdict.comparable_key(record) == comparable \
                and (verdict.code_key(record), record.get("seed")) not in seen:
            seen.add((verdict.code_key(record), record.get("seed")))
            total, n = sums.get(verdict.code_key(record), (0.0, 0))
            sums[verdict.code_key(record)] = (total + record["val_bpb"], n + 1)
            running = min(t / k for t, k in sums.values())
        out.append(running)
    return out


def agents_of(rows: list) -> list:
    """[(agent, runs)] of `rows`: the distinct agents and models of the sessions that made them
    (each row's `agent`, recorded by analyze.py in a night since rows knew it), in order of first
    use, with how many rows each made; rows without one (by hand, or older) are not counted."""
    return list(Counter(r["agent"] for r in rows if r.get("agent")).items())


def clock(when) -> str:
    """A local time stamp for the page ("2026-12-04 22:01"), or "—"."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(when)) if when else "—"


def night_summaries(store: Store, ledger: list, spans: list, best_after: list, row_times) -> list:
    """A line per night: its number, first and last row's time, runs, keeps, crashes, workers, its
    agents (agents_of), the best at its end, and its own page (its file name when
    written, and the command that writes it). Computed from the ledger (`row_times`: row_time of
    every row); one stat per night."""
    out = []
    for n, (first, end) in enumerate(spans, start=1):
        rows = ledger[first:end]
        counts = Counter(r.get("status") for r in rows)
        times = [t for t in row_times[first:end] if t is not None]
        page = NIGHT_PAGE.format(n=n)
        out.append({"n": n, "first": first + 1, "last": end, "runs": len(rows),
                    "started": clock(min(times) if times else None),
                    "ended": clock(max(times) if times else None),
                    "hours": (max(times) - min(times)) / 3600 if times else None,
                    "keeps": counts["keep"],
                    "crashes": sum(counts[s] for s in verdict.FAILED_STATUSES),
                    "workers": len({worker_of(r) for r in rows}),
                    "agents": agents_of(rows),
                    "best": best_after[end - 1],
                    "page": page if store.path(page).exists() else None,
                    "command": f"uv run analyze.py report --night {n}"})
    return out


def chosen_span(spans: list, night):
    """(its number, (first, end)) of the night to show in full: `night` (1-based), or the last;
    (None, None) for an empty store. A night the store does not have is a HarnessError."""
    if night is None:
        return (len(spans), spans[-1]) if spans else (None, None)
    if not 1 <= night <= len(spans):
        have = f"nights 1-{len(spans)}" if spans else "no runs yet"
        raise HarnessError(f"there is no night {night} in the store ({have}); "
                           f"`uv run analyze.py report` shows the last")
    return night, spans[night - 1]


def chain_on_page(chain: list, span: tuple, best_key) -> list:
    """The kept changes the page shows in full: the baseline, those kept in the shown night and
    the best; each run of others, kept in earlier or later nights, is one {"gap": count, "when"}
    line in its place."""
    out = []
    for entry in chain:
        full = entry is chain[0] or entry["key"] == best_key \
            or span[0] <= entry["kept_at"] < span[1]
        if full:
            out.append(entry)
            continue
        when = "earlier" if entry["kept_at"] < span[0] else "later"
        if out and out[-1].get("gap") and out[-1]["when"] == when:
            out[-1]["gap"] += 1
        else:
            out.append({"gap": 1, "when": when})
    return out


def of_page(ledger: list, night) -> tuple:
    """(row_time of every row, the nights' spans, the number of the night shown in full, its
    span) for a page of `night` (1-based; None: the last); an empty store: night None, (0, 0)."""
    row_times = [row_time(r) for r in ledger]
    spans = night_spans(ledger, row_times)
    shown, span = chosen_span(spans, night)
    return row_times, spans, shown, span or (0, 0)
