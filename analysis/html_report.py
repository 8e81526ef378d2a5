"""
The morning report: .auto-log-research/report.html, one page that tells what the night found.

    uv run analyze.py report              (supervise.py regenerates it after every new ledger row)
    uv run analyze.py report --night N    (night N in full instead, in report-night-N.html)

One night is shown in full, the last by default (analysis/nights.py: what a night is), and every
night as a line of a table. The headline, the best and the kept chain's ends are the whole store's,
from the ledger; what costs a file read or a rendering per run (the runs table, each run's analysis,
notes and figures, the failures, the progress chart's points) is the shown night's only, so the
page's time and size do not grow with the store's age.

In order: the night in one line and the progress chart; the nights; the chain of kept changes from
the baseline to the best, each with its numbers and its diff (those kept in other nights one line
per stretch); what the agent learned (insights.md, ideas_queue.md and the night's runs' notes); a
sortable, filterable table of the night's runs, each row opening that run's analysis.md with its
plots; failures grouped by cause; the kept runs' validation curves and the per-layer gradient
norms of the best next to the baseline's.

Self-contained means no network and no server: no CDN, the CSS and the script are inline, and so are
the two charts that carry the page (progress and validation curves, inline SVG drawn from the ledger
and the kept runs' validation points, no matplotlib). The per-run figures analyze.py already wrote
are linked relatively (`<run_id>/loss_vs_step.png`): the page lives in the store next to the run
folders, so they load from file:// and the page stays small (under 1 MB for a night of 100 runs);
they are loaded only when a run is opened. Nothing is cached between calls: every call reads the
ledger and the shown night's run folders as they are now. The page is built with Jinja2
(analysis/templates/report.html.j2) and the .md files are rendered with markdown-it-py with raw
HTML disabled (the agent writes them; nothing it writes runs). A ledger that fails its chain or a
row check (analysis/store.py) gets a page with only a red banner naming its first broken row
(analysis/templates/broken.html.j2): no numbers from a ledger edited by hand.
"""

import json
import math
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np

from harness import contract, fixed
from analysis import claims, confirmation, nights, pairing, plots, report, verdict
from analysis.store import (IDEAS, INSIGHTS, PROGRESS_PNG, REPORT_HTML, SANDBOX_LOG, STORE_DIR,
                            UNBOXED, LedgerError, Store, worker_of)

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE = "report.html.j2"
BROKEN_TEMPLATE = "broken.html.j2"  # the page of a broken ledger: its banner only
# a page left open reloads this often (the supervisor rewrites it after every run)
REFRESH_S = 60
# a kept change's diff shown in full up to this many lines (the rest is in diff.patch)
MAX_DIFF_LINES = 400
# validation curves overlaid: the baseline, the best and the latest kept codes
MAX_VAL_CURVES = 12
# experiments per hour is shown once the night is this long (a rate over minutes is noise)
MIN_HOURS_FOR_RATE = 0.1
# the validation chart leaves out this first fraction of the steps: the initial drop would flatten
# the differences between runs that matter
VAL_SKIP_FRACTION = 0.2
MAX_FAILURE_RUNS = 30         # run ids listed per failure cause (then "and N more")
SVG_W, SVG_H = 960, 300       # the charts' drawing size in px (they scale with the page width)
PAD = dict(left=58, right=12, top=14, bottom=34)  # room for the axis labels
# the progress chart's y axis ends a little above this quantile of the finished runs: one diverged
# run (val_bpb 8) must not squash the rest into a line; higher ones are drawn at the top edge as
# triangles
Y_CLIP_QUANTILE = 0.9
FAILED_LABELS = {"crash": "crash", "nan": "nan", "timeout": "timeout", "invalid": "invalid"}
RUN_FIGURES = [p.file for p in plots.PLOTS] + [plots.LAYER_HEATMAP, plots.AGENT_PLOT]


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------

# an image the agent's markdown names on another host (or any scheme but data:), which the page
# would fetch when the human opens it: shown as a link (the page's Content-Security-Policy blocks it
# too)
REMOTE_URL = re.compile(r"^(//|(?!data:)[a-z][a-z0-9+.-]*:)", re.I)


def markdown_renderer():
    """markdown-it-py, CommonMark plus tables, raw HTML off; relative links and images resolve from
    the run folder a document belongs to (env["base"]), since the page lives one folder up; remote
    images become links."""
    from markdown_it import MarkdownIt
    from markdown_it.common.utils import escapeHtml
    md = MarkdownIt("commonmark", {"html": False}).enable("table")

    def relative(url: str, env: dict) -> str:
        base = (env or {}).get("base", "")
        return url if not base or re.match(r"^([a-z][a-z0-9+.-]*:|/|#)", url, re.I) else base + url

    # bound to the renderer, as markdown-it-py's own rules
    def link_open(renderer, tokens, idx, options, env):
        token = tokens[idx]
        token.attrSet("href", relative(str(token.attrGet("href") or ""), env))
        return renderer.renderToken(tokens, idx, options, env)

    def image(renderer, tokens, idx, options, env):
        token = tokens[idx]
        src = str(token.attrGet("src") or "")
        if REMOTE_URL.match(src):  # never fetched when the page opens (a beacon): a link instead
            alt = renderer.renderInlineAsText(token.children or [], options, env) or src
            return f'<a href="{escapeHtml(src)}">{escapeHtml(alt)}</a>'
        token.attrSet("src", relative(src, env))
        return renderer.image(tokens, idx, options, env)

    md.add_render_rule("link_open", link_open)
    md.add_render_rule("image", image)
    return md


def read_text(path: Path):
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return None


def unboxed_night(store: Store):
    """Why the store's latest night ran its agent outside its box ("<its start>: why"), or None:
    boxed, or no night yet (night/sandbox.py writes "<start> | UNBOXED: why" at a night's start)."""
    lines = (read_text(store.path(SANDBOX_LOG)) or "").splitlines()
    started, _, state = (lines[-1] if lines else "").partition(f" | {UNBOXED}: ")
    return f"{started}: {state}" if state else None


def without_comments(text: str) -> str:
    """Markdown without its HTML comments (insights.md's Current Best markers): raw HTML is not
    rendered, so they would show as text."""
    return re.sub(r"<!--.*?-->", "", text, flags=re.S)


def split_notes(analysis: str) -> tuple:
    """(analysis.md before its Agent Investigation Notes heading, what is written below it: the
    pointer to the run's notes file, or in a store from before notes/ the agent's notes)."""
    if report.NOTES_HEADING not in analysis:
        return analysis, ""
    head, notes = analysis.rsplit(report.NOTES_HEADING, 1)
    return head, notes.strip()


def run_notes(store: Store, run_id: str, below_heading: str) -> str:
    """The agent's notes on a run: its notes file, else (a store from before notes/) what it
    wrote below analysis.md's heading."""
    written = read_text(store.run_notes(run_id))
    if written is not None:
        return written.strip()
    return "" if below_heading.startswith(report.NOTES_POINTER) else below_heading


# ---------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------

def fmt(value, digits: int = 6, signed: bool = False, unit: str = "") -> str:
    if not contract.finite_number(value):
        return "—"
    return (f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}") + unit


def pooled_mean(records) -> float:
    return float(np.mean([r["val_bpb"] for r in records]))


def noise_sigma(noise: dict, best_mean):
    """(σ, where it comes from) as the verdict uses it: the pooled estimate once trusted, else the
    deliberately large assumption; never below the floor."""
    if best_mean is None:
        return None, "no best yet"
    if noise["trusted"]:
        sigma, source = noise["sigma"], f"pooled from repeats ({noise['df']} df)"
    else:
        sigma, source = verdict.FALLBACK_NOISE_FRACTION * best_mean, \
            (f"assumed {verdict.FALLBACK_NOISE_FRACTION:.1%} of the best (only {noise['df']} df "
             f"measured)")
    floor = verdict.NOISE_FLOOR_FRACTION * best_mean
    return (floor, source + ", raised to the floor") if sigma < floor else (sigma, source)


def night_hours(ledger: list):
    """Hours from the first run's start to the last run's analysis, or None."""
    start = next((t for t in (contract.parse_stamp(r.get("started_at"))
                              or contract.parse_stamp(r.get("analyzed_at")) for r in ledger)
                  if t is not None), None)
    end = next((t for t in (contract.parse_stamp(r.get("analyzed_at")) for r in reversed(ledger))
                if t is not None), None)
    if start is None or end is None or end < start:
        return None
    return (end - start) / 3600


def failure_cause(record: dict) -> str:
    if record.get("status") == "invalid":
        return "INVALID: " + ((record.get("integrity") or ["integrity check failed"])[0])
    return (record.get("error") or "(no error line recorded)").strip().splitlines()[0]


def cause_key(cause: str) -> str:
    """Causes that differ only in numbers (an allocation size, a line number) are one cause."""
    return re.sub(r"\d+(\.\d+)?", "N", cause)


def summary_line(ledger: list, best, noise: dict, chain: list) -> dict:
    counts = Counter(r.get("status") for r in ledger)
    finished = [r for r in ledger if verdict.finished(r)]
    best_mean = pooled_mean(best[1]) if best else None
    sigma, sigma_source = noise_sigma(noise, best_mean)
    baseline_mean = chain[0]["mean"] if chain else None
    gain = best_mean - baseline_mean if best and baseline_mean is not None else None
    hours = night_hours(ledger)
    devices = Counter(r.get("device") for r in finished if r.get("device")) or \
        Counter(r.get("device") for r in ledger if r.get("device"))
    mfus = [r["mfu_percent"] for r in (best[1] if best else finished)
            if contract.finite_number(r.get("mfu_percent"))]
    return {"experiments": len(ledger), "keeps": counts["keep"], "discards": counts["discard"],
            "reruns": counts["rerun"], "pending": counts["pending"],
            "crashes": sum(counts[s] for s in verdict.FAILED_STATUSES),
            "invalid": counts["invalid"],
            "baseline": baseline_mean, "best": best_mean, "gain": gain,
            "gain_sigma": gain / sigma if gain is not None and sigma else None,
            "sigma": sigma, "sigma_source": sigma_source, "noise_trusted": noise["trusted"],
            "best_id": best[1][-1]["run_id"] if best else None,
            "best_description": best[1][0].get("description") if best else None,
            "hours": hours,
            "per_hour": len(ledger) / hours if hours and hours >= MIN_HOURS_FOR_RATE else None,
            "device": devices.most_common(1)[0][0] if devices else None,
            "mfu": float(np.median(mfus)) if mfus else None}


# ---------------------------------------------------------------------------
# The kept changes
# ---------------------------------------------------------------------------

def diff_lines(text: str) -> list:
    """[(css class, line)] of a unified diff, for colouring: added, removed, hunk header, file
    header."""
    out = []
    for line in text.splitlines()[:MAX_DIFF_LINES]:
        kind = ("meta" if line.startswith(("+++", "---", "# ")) else "add" if line.startswith("+")
                else "del" if line.startswith("-") else "hunk" if line.startswith("@@") else "ctx")
        out.append((kind, line))
    return out


def kept_chain(store: Store, ledger: list, comparable, shown=None, groups=None) -> list:
    """The kept codes of the best's pool in the order they were first kept, each with the numbers
    of the verdict that kept it (its last run with a verdict), its pooled mean now, the row index
    it was first kept at (`kept_at`), and its diff.patch: read for every code, or with `shown` (a
    predicate on an entry) only for the entries it accepts (the others get diff None); `groups`:
    verdict.pools(ledger, comparable), when the caller has it."""
    if comparable is None:
        return []
    index = {r["run_id"]: i for i, r in enumerate(ledger)}
    chain = []
    groups = groups if groups is not None else verdict.pools(ledger, comparable)
    for key, records in groups.items():
        if not any(r.get("status") == "keep" for r in records):
            continue
        decisive = next((r for r in reversed(records) if r.get("verdict") == "keep"), records[-1])
        entry = {"key": key, "records": records, "run_id": records[-1]["run_id"],
                 "run_ids": [r["run_id"] for r in records],
                 "description": records[0].get("description"),
                 "commit": records[0].get("commit"), "mean": pooled_mean(records),
                 "n": len(records), "delta": decisive.get("delta_best"),
                 "delta_sigma": decisive.get("delta_sigma"),
                 "p_value": decisive.get("p_value"), "reason": decisive.get("verdict_reason"),
                 "kept_at": min(index[r["run_id"]] for r in records if r.get("status") == "keep"),
                 "diff": None, "diff_cut": 0}
        chain.append(entry)
    for pos, entry in enumerate(chain):
        entry["pos"] = pos
        if shown is None or shown(entry):
            diff = read_text(store.run_path(entry["records"][0]["run_id"]) / "diff.patch") or ""
            entry["diff"] = diff_lines(diff) if not diff.startswith("# nothing to compare") else []
            entry["diff_cut"] = max(0, len(diff.splitlines()) - MAX_DIFF_LINES)
    return chain


# ---------------------------------------------------------------------------
# Charts (inline SVG: geometry here, elements in the template)
# ---------------------------------------------------------------------------

def nice_ticks(lo: float, hi: float, n: int = 5) -> list:
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


class Axes:
    """Data to SVG coordinates over the plotting area."""

    def __init__(self, x0, x1, y0, y1):
        self.x0, self.x1 = x0, x1 if x1 > x0 else x0 + 1
        pad = 0.06 * (y1 - y0) if y1 > y0 else max(abs(y0) * 0.01, 1e-3)
        self.y0, self.y1 = y0 - pad, y1 + pad
        self.left, self.right = PAD["left"], SVG_W - PAD["right"]
        self.top, self.bottom = PAD["top"], SVG_H - PAD["bottom"]

    def x(self, v):
        return round(self.left + (v - self.x0) / (self.x1 - self.x0) * (self.right - self.left), 1)

    def y(self, v):
        v = min(max(v, self.y0), self.y1)
        return round(self.bottom - (v - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top),
                     1)

    def frame(self, x_ticks, y_ticks, y_digits: int) -> dict:
        return {"left": self.left, "right": self.right, "top": self.top, "bottom": self.bottom,
                "xticks": [(self.x(t), f"{t:g}") for t in x_ticks if self.x0 <= t <= self.x1],
                "yticks": [(self.y(t), f"{t:.{y_digits}f}") for t in y_ticks
                           if self.y0 <= t <= self.y1]}


def y_digits(lo: float, hi: float) -> int:
    span = hi - lo
    return min(6, max(2, 1 - math.floor(math.log10(span / 5)))) if span > 0 else 4


def progress_chart(ledger: list, best_mean, sigma, comparable=None, span=None, best_after=None):
    """The runs of `span` (row indices (first, end); default every row) in ledger order (kept
    highlighted, failures as crosses on the top edge), the running best (`best_after`: running_best
    of the whole ledger, so a night's line starts at the best it started from) and the noise band
    (± σ) around the best; None without runs."""
    if not ledger:
        return None
    first, end = span or (0, len(ledger))
    best_after = nights.running_best(ledger, comparable) if best_after is None else best_after
    shown = ledger[first:end]
    values = [r["val_bpb"] if verdict.finished(r) else None for r in shown]
    finite = np.array([v for v in values if v is not None], float)
    kept_values = [v for v, r in zip(values, shown) if v is not None and r.get("status") == "keep"]
    if len(finite):
        lo = float(min(finite.min(), best_mean - (sigma or 0)) if best_mean is not None
                   else finite.min())
        hi = float(np.quantile(finite, Y_CLIP_QUANTILE))
        hi = max([hi, *kept_values] + ([best_mean + (sigma or 0)] if best_mean is not None else []))
        hi += 0.1 * (hi - lo)
    else:
        lo, hi = 0.0, 1.0
    ax = Axes(first + 0.5, end + 0.5, lo, hi)
    points, best_path = [], []
    for i, (record, value) in enumerate(zip(shown, values), start=first + 1):
        status = record.get("status")
        tip = (f"#{i} {record['run_id']} · {status}"
               + (f" · {value:.6f}" if value is not None else f" · {failure_cause(record)[:120]}")
               + f" · {record.get('description') or ''}")
        kind = "fail" if value is None else "keep" if status == "keep" else "run"
        y = ax.y(value) if value is not None else ax.top
        points.append({"x": ax.x(i), "y": y, "kind": kind, "tip": tip, "run_id": record["run_id"],
                       "clipped": value is not None and value > ax.y1})
        running = best_after[i - 1]
        if running is not None:
            best_path.append(f"{ax.x(i - 0.5) if not best_path else ax.x(i)},{ax.y(running)}")
            best_path.append(f"{ax.x(i + 0.5 if i == end else i + 1)},{ax.y(running)}")
    band = None
    if best_mean is not None and sigma:
        band = {"y": ax.y(best_mean + sigma),
                "h": round(ax.y(best_mean - sigma) - ax.y(best_mean + sigma), 1),
                "mid": ax.y(best_mean)}
    x_ticks = nice_ticks(first + 1, end, 8) if end - first > 1 else [first + 1]
    return {"w": SVG_W, "h": SVG_H,
            "frame": ax.frame([t for t in x_ticks if t == int(t)], nice_ticks(ax.y0, ax.y1),
                              y_digits(ax.y0, ax.y1)),
            "points": points, "best_path": " ".join(best_path), "band": band}


def val_points(path: Path) -> list:
    """[(step, val/bpb)] of a run's metrics.jsonl. Only the lines that hold a validation point are
    parsed (a 5-minute run has a thousand lines of per-step metrics, about ten of them validation
    points)."""
    text = read_text(path)
    if not text:
        return []
    out = []
    for line in text.splitlines():
        if contract.VAL_BPB not in line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # a truncated line of a crash; read_metrics reports it in that run's analysis.md
            continue
        if isinstance(record, dict) and contract.finite_number(record.get(contract.STEP)) \
                and contract.finite_number(record.get(contract.VAL_BPB)):
            out.append((record[contract.STEP], record[contract.VAL_BPB]))
    return out


def val_chart(store: Store, chain: list, best_key):
    """The kept codes' validation curves overlaid (the latest run of each; the baseline, the best
    and the latest kept codes up to MAX_VAL_CURVES), the best drawn strongest; None without any
    points."""
    if not chain:
        return None
    chosen = chain if len(chain) <= MAX_VAL_CURVES else \
        [chain[0]] + [c for c in chain[1:] if c["key"] == best_key] + \
        [c for c in chain[1:] if c["key"] != best_key][-(MAX_VAL_CURVES - 2):]
    chosen = sorted({id(c): c for c in chosen}.values(), key=lambda c: chain.index(c))
    series = []
    for entry in chosen:
        run = next((r for r in reversed(entry["records"])
                    if (store.run_path(r["run_id"]) / contract.RUN_METRICS).exists()), None)
        points = val_points(store.run_path(run["run_id"]) / contract.RUN_METRICS) if run else []
        if points:
            series.append((entry, run["run_id"], points))
    if not series:
        return None
    start = VAL_SKIP_FRACTION * max(p[0] for _, _, pts in series for p in pts)
    series = [(e, r, [p for p in pts if p[0] >= start] or pts[-1:]) for e, r, pts in series]
    xs = [p[0] for _, _, pts in series for p in pts]
    ys = [p[1] for _, _, pts in series for p in pts]
    ax = Axes(min(xs), max(xs), min(ys), max(ys))
    lines = []
    for n, (entry, run_id, points) in enumerate(series):
        is_best, is_base = entry["key"] == best_key, entry is chain[0]
        share = n / max(len(series) - 1, 1)
        colour = ("#1a7f37" if is_best else "#6e7781" if is_base
                  else f"hsl({210 + 60 * share:.0f},55%,{62 - 20 * share:.0f}%)")
        lines.append({"points": " ".join(f"{ax.x(s)},{ax.y(v)}" for s, v in points),
                      "colour": colour,
                      "width": 2.4 if is_best else 1.3, "dash": "5,3" if is_base else "",
                      "label": ("best · " if is_best else "baseline · " if is_base else "")
                               + f"{run_id} {entry['description'] or ''}"[:70],
                      "final": fmt(points[-1][1], 4)})
    return {"w": SVG_W, "h": SVG_H,
            "frame": ax.frame(nice_ticks(ax.x0, ax.x1, 8), nice_ticks(ax.y0, ax.y1),
                              y_digits(ax.y0, ax.y1)), "lines": lines,
            "skipped_pct": round(100 * VAL_SKIP_FRACTION)}


# ---------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------

def run_row(store: Store, index: int, record: dict, md, names: set) -> dict:
    """A row of the runs table with what opening it shows: its analysis.md rendered, and its
    figures."""
    run_id = record["run_id"]
    folder = store.run_path(run_id)
    analysis = read_text(folder / "analysis.md")
    head, below = split_notes(analysis) if analysis is not None else (None, "")
    notes = run_notes(store, run_id, below)
    env = {"base": f"{run_id}/"}
    vram = record.get("peak_vram_mb")
    started = contract.parse_stamp(record.get("started_at"))
    return {"i": index, "run_id": run_id, "status": record.get("status"),
            "verdict": record.get("verdict") or "",
            "description": record.get("description") or "", "seed": record.get("seed"),
            "worker": worker_of(record), "agent": record.get("agent") or "",
            "val_bpb": record.get("val_bpb") if verdict.finished(record) else None,
            "shown_val": record.get("val_bpb"), "delta": record.get("delta_best"),
            "delta_sigma": record.get("delta_sigma"), "p_value": record.get("p_value"),
            "steps": record.get("num_steps"), "mfu": record.get("mfu_percent"),
            "vram_gb": vram / 1024 if contract.finite_number(vram) else None,
            "seconds": record.get("training_seconds"),
            "started": time.strftime("%m-%d %H:%M", time.localtime(started)) if started else "",
            "started_sort": started or 0,
            "cause": failure_cause(record) if not verdict.finished(record) else "",
            "analysis_html": md.render(head, env) if head is not None else None,
            "notes_html": md.render(notes, env) if notes else "",
            "figures": [f for f in RUN_FIGURES if f in names.get(run_id, ())]}


def failure_groups(ledger: list, first: int = 0) -> list:
    """The failed runs of `ledger` (rows from index `first` of the store's) grouped by cause, the
    largest group first, each with its latest runs (numbered as in the store)."""
    groups = {}
    for i, record in enumerate(ledger, start=first + 1):
        if verdict.finished(record) or record.get("status") not in verdict.NOT_COUNTED:
            continue
        cause = failure_cause(record)
        group = groups.setdefault(cause_key(cause),
                                  {"cause": cause, "runs": [], "statuses": Counter()})
        group["cause"] = cause  # the latest wording
        group["runs"].append((i, record["run_id"]))
        group["statuses"][record.get("status")] += 1
    out = sorted(groups.values(), key=lambda g: -len(g["runs"]))
    for g in out:
        g["more"] = max(0, len(g["runs"]) - MAX_FAILURE_RUNS)
        g["first"], g["last"] = g["runs"][0][0], g["runs"][-1][0]
        g["runs"] = g["runs"][-MAX_FAILURE_RUNS:]
        g["statuses"] = ", ".join(f"{n} {s}" for s, n in g["statuses"].most_common())
    return out


def figure_names(store: Store, ledger: list) -> dict:
    """{run_id: names of the PNGs in its folder}: one listing per folder, only figures that exist
    are linked."""
    out = {}
    for record in ledger:
        try:
            out[record["run_id"]] = {p.name for p in store.run_path(record["run_id"]).iterdir()
                                     if p.suffix == ".png"}
        except FileNotFoundError:
            out[record["run_id"]] = set()
    return out


def build_context(store: Store, night=None) -> dict:
    """Everything the template shows, read from the store as it is now: the headline, the kept
    chain's ends and the nights' lines from the whole ledger; each run's row, analysis, notes and
    figures only for the night shown in full (`night`, 1-based; default the last)."""
    ledger = store.read_ledger()
    comparable = verdict.store_comparable(ledger)
    groups = verdict.pools(ledger, comparable) if ledger else {}
    noise = verdict.noise_estimate([[r["val_bpb"] for r in g] for g in groups.values()])
    best = verdict.best_pool(ledger, comparable) if ledger else None
    row_times, spans, shown_night, span = nights.of_page(ledger, night)
    best_key = best[0] if best else None
    chain = kept_chain(store, ledger, comparable,
                       shown=lambda e: e["pos"] == 0 or e["key"] == best_key
                       or span[0] <= e["kept_at"] < span[1], groups=groups)
    summary = summary_line(ledger, best, noise, chain)
    best_after = nights.running_best(ledger, comparable)
    md = markdown_renderer()
    night_rows = ledger[span[0]:span[1]]
    names = figure_names(store, night_rows)
    rows = [run_row(store, i, r, md, names) for i, r in enumerate(night_rows, start=span[0] + 1)]
    insights, ideas = read_text(store.note(INSIGHTS)), read_text(store.note(IDEAS))
    base_run = chain[0]["run_id"] if chain else None
    best_run = best[1][-1]["run_id"] if best else None
    other_kept = sum(1 for r in ledger
                     if r.get("status") == "keep" and verdict.comparable_key(r) != comparable)

    def heatmap(run_id):  # the best's or the baseline's, wherever in the store it is
        return run_id if run_id and (store.run_path(run_id) / plots.LAYER_HEATMAP).exists() \
            else None

    return {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "store": STORE_DIR, "refresh_s": REFRESH_S,
        # what a night's supervisor found changed in the fixed files: first, in red
        "tampering": (read_text(store.path(fixed.TAMPERING_FILE)) or "").splitlines(),
        "unboxed": unboxed_night(store),
        "confirmation": (confirmation.describe(confirmed)
                         if (confirmed := confirmation.load(store)) else None),
        "summary": summary, "fmt": fmt,
        "seed_pairing": report.seed_share_line(pairing.store_share(
            groups, best_key, noise["sigma"] if noise["trusted"] else None)),
        "progress": progress_chart(ledger, summary["best"], summary["sigma"], comparable, span,
                                   best_after),
        "progress_png": store.path(PROGRESS_PNG).exists(),
        "chain": nights.chain_on_page(chain, span, best_key), "best_key": best_key,
        "other_kept": other_kept,
        "nights": nights.night_summaries(store, ledger, spans, best_after, row_times),
        "shown_night": shown_night, "chosen": night is not None,
        "insights_html": md.render(without_comments(insights)) if insights else None,
        "ideas_html": md.render(without_comments(ideas)) if ideas else None,
        "notes": [r for r in rows if r["notes_html"]],
        "rows": rows, "statuses": sorted({r["status"] for r in rows}),
        "failures": failure_groups(night_rows, span[0]),
        "workers": report.worker_progress(night_rows,
                                          [c for c in claims.read(store)
                                           if claims.is_live(c, claims.alive_in(store))]),
        "val_chart": val_chart(store, chain, best_key),
        "grad": {"best": heatmap(best_run), "baseline": heatmap(base_run),
                 "same": (best_run == base_run
                          or (best is not None and chain and best[0] == chain[0]["key"]))},
    }


def shown_text(context: dict) -> str:
    """What a page shows, for analyze.py's line: "night 3 of 3: 100 of 2,000 runs"."""
    if not context["nights"]:
        return "no runs yet"
    return (f"night {context['shown_night']} of {len(context['nights'])}: "
            f"{len(context['rows'])} of {context['summary']['experiments']:,} runs")


def render(store: Store, night=None) -> tuple:
    """(the page, None, what it shows: shown_text), or of a broken ledger (its banner page, the
    LedgerError, None); `night`: the night shown in full (1-based), default the last."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
    env = Environment(loader=FileSystemLoader(TEMPLATE_DIR),
                      autoescape=select_autoescape(["j2", "html"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    try:
        context = build_context(store, night)
    except LedgerError as e:
        return env.get_template(BROKEN_TEMPLATE).render(
            problem=str(e), store=STORE_DIR, refresh_s=REFRESH_S,
            generated=time.strftime("%Y-%m-%d %H:%M:%S")), e, None
    return env.get_template(TEMPLATE).render(**context), None, shown_text(context)


def write(store: Store, night=None) -> tuple:
    """Write the page into the store (atomically: a browser reloading it never reads half a page):
    report.html, or with `night` (1-based) that night's NIGHT_PAGE. (its path, None, what it
    shows), or (its path, the LedgerError, None) when it is a broken ledger's banner."""
    html, broken, shown = render(store, night)
    store.dir.mkdir(parents=True, exist_ok=True)
    path = store.path(REPORT_HTML if night is None else nights.NIGHT_PAGE.format(n=night))
    contract.atomic_write(path, html)
    return path, broken, shown
