"""
Figures of a run overlaid with the best and the previous run, and the store's progress.png.

Every per-run line plot is driven from PLOTS, one list of (file, title, x key, panels); each panel
draws one metrics key for every run given. Figures are built with matplotlib's object API (no
pyplot state, Agg canvas) and returned before saving, so tests can assert on the plotted data.
"""

import io
import os
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness import contract
from analysis import stats, verdict
from harness.contract import HarnessError

DPI = 90                      # small files the agent can read quickly; enough to see the curves
PANEL_SIZE = (7.0, 2.6)       # inches per panel (width, height)
# this run, best, previous
RUN_STYLES = ({"color": "tab:blue", "lw": 1.4}, {"color": "tab:green", "lw": 1.0, "alpha": 0.8},
              {"color": "tab:gray", "lw": 1.0, "alpha": 0.7, "ls": "--"})
# fixed: tight_layout costs a full draw
MARGINS = dict(left=0.12, right=0.97, top=0.90, bottom=0.12, hspace=0.35)
# parameter names written beside the heatmap rows (every k-th beyond that)
MAX_HEATMAP_LABELS = 30
# progress.png labels the latest kept runs that set a new best, up to this many
MAX_PROGRESS_LABELS = 25
MAX_PROGRESS_LABEL = 40       # characters of a kept run's description written on progress.png
WRITE_FAILED = 75             # the drawing process's exit code where a figure could not be written


def new_figure(**kwargs):
    """A new matplotlib figure on the Agg canvas. matplotlib is imported here, on first use, so that
    importing this module (for PLOTS and the file names) costs nothing."""
    import matplotlib
    matplotlib.use("Agg")  # no display: the loop runs headless overnight
    from matplotlib.figure import Figure as MplFigure
    return MplFigure(**kwargs)


@dataclass(frozen=True)
class Panel:
    key: str                  # metrics key drawn for every run
    ylabel: str
    raw: str = None           # a second key drawn faintly for this run only (the unsmoothed loss)
    log: bool = False
    markers: bool = False     # periodic keys (validation points) are drawn as points


@dataclass(frozen=True)
class Plot:
    file: str
    title: str
    x: str
    xlabel: str
    panels: tuple


PLOTS = (
    Plot("loss_vs_step.png", "training loss vs step", contract.STEP, "step",
         (Panel(contract.TRAIN_LOSS_SMOOTH, "train loss (nats/token, EMA)",
                raw=contract.TRAIN_LOSS),)),
    Plot("loss_vs_time.png", "training loss vs training time", contract.TIME_S, "training time (s)",
         (Panel(contract.TRAIN_LOSS_SMOOTH, "train loss (nats/token, EMA)"),)),
    Plot("val_bpb.png", "validation curve", contract.STEP, "step",
         (Panel(contract.VAL_BPB, "val bpb", markers=True),)),
    Plot("schedules.png", "schedules", contract.STEP, "step",
         (Panel(contract.LR_MULTIPLIER, "lr multiplier"),
          Panel(contract.MUON_MOMENTUM, "Muon momentum"),
          Panel(contract.WEIGHT_DECAY, "weight decay"))),
    Plot("perf.png", "step time and MFU", contract.STEP, "step",
         (Panel(contract.STEP_TIME_MS, "step time (ms)"), Panel(contract.MFU_PERCENT, "MFU (%)"))),
)
LAYER_HEATMAP = "layer_grad_norm.png"
AGENT_PLOT = "agent_metrics.png"
# the agent's own metrics drawn (the first, by name); analysis.md lists them all
MAX_AGENT_PANELS = 6


def _title(ax, text: str, size: int = 8):
    """A title as plain axes text: Axes.set_title re-measures the whole axes on every draw
    (slow)."""
    ax.text(0.0, 1.02, text, transform=ax.transAxes, fontsize=size, ha="left", va="bottom")


def line_figure(plot: Plot, runs: list):
    """runs: [(label, records)], this run first; a run without the key is simply absent from a
    panel."""
    fig = new_figure(figsize=(PANEL_SIZE[0], PANEL_SIZE[1] * len(plot.panels) + 0.4), dpi=DPI)
    axes = fig.subplots(len(plot.panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, plot.panels):
        for i, (label, records) in enumerate(runs):
            style = RUN_STYLES[min(i, len(RUN_STYLES) - 1)]
            if i == 0 and panel.raw:
                x, y = stats.series(records, panel.raw, plot.x)
                ax.plot(x, y, color=style["color"], lw=0.5, alpha=0.25, label=f"{label} (raw)")
            x, y = stats.series(records, panel.key, plot.x)
            if len(x):
                ax.plot(x, y, label=label, marker="o" if panel.markers else None, ms=4, **style)
        ax.set_ylabel(panel.ylabel, fontsize=8)
        _title(ax, panel.key)
        if panel.log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel(plot.xlabel, fontsize=8)
    fig.text(0.5, 0.98, plot.title, ha="center", va="top", fontsize=9)
    fig.subplots_adjust(**MARGINS)
    _focus_loss_axis(plot, axes[0], runs)
    return fig


def _focus_loss_axis(plot: Plot, ax, runs):
    """Loss curves: start the y axis below the first 5 % of steps, where the initial drop would
    flatten the rest."""
    if plot.panels[0].key != contract.TRAIN_LOSS_SMOOTH:
        return
    tails = [stats.series(records, contract.TRAIN_LOSS_SMOOTH, plot.x)[1] for _, records in runs]
    tails = [y[len(y) // 20:] for y in tails if len(y) >= 20]
    if tails:
        lo, hi = min(float(t.min()) for t in tails), max(float(t.max()) for t in tails)
        pad = 0.05 * (hi - lo or 1.0)
        # huge (finite) losses overflow the padding: keep the default
        if np.isfinite([lo - pad, hi + pad]).all():
            ax.set_ylim(lo - pad, hi + pad)


def short_name(name: str) -> str:
    """blocks.3.attn.c_q.weight -> 3.attn.c_q: row labels short enough to read."""
    return name.removeprefix("blocks.").removesuffix(".weight")


def heatmap_grid(table: dict, names: list):
    """(steps, log10 grad norm [row per name]) of one run; a zero or missing gradient is NaN
    (blank)."""
    steps = next(iter(table.values()))["grad_norm"][0]
    rows = []
    for name in names:
        _, v = table.get(name, {}).get("grad_norm", (np.empty(0), np.empty(0)))
        rows.append(v if len(v) == len(steps) else np.full(len(steps), np.nan))
    with np.errstate(divide="ignore", invalid="ignore"):
        return steps, np.where(np.array(rows) > 0, np.log10(np.array(rows)), np.nan)


def layer_heatmap(runs: list):
    """log10 gradient norm of every parameter matrix (rows) at every measured step (columns), one
    panel per run side by side on one colour scale."""
    tables = [(label, stats.layer_table(records)) for label, records in runs]
    tables = [(label, t) for label, t in tables if t]
    if not tables:
        fig = new_figure(figsize=(PANEL_SIZE[0], 1.5), dpi=DPI)
        fig.text(0.5, 0.5, "no per-layer statistics in metrics.jsonl", ha="center")
        return fig
    names = sorted(tables[0][1])
    grids = [(label, *heatmap_grid(table, names)) for label, table in tables]
    finite = np.concatenate([g[np.isfinite(g)] for _, _, g in grids])
    # one outlier cannot wash out the rest
    vmin, vmax = np.percentile(finite, [2, 98]) if len(finite) else (None, None)
    fig = new_figure(figsize=(PANEL_SIZE[0], 1.0 + max(2.0, 0.12 * len(names))), dpi=DPI)
    axes = fig.subplots(1, len(grids), sharey=True, squeeze=False)[0]
    for ax, (label, steps, grid) in zip(axes, grids):
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", vmin=vmin, vmax=vmax,
                          cmap="viridis", extent=(steps[0], steps[-1], len(names) - 0.5, -0.5))
        _title(ax, label)
        ax.tick_params(labelsize=6)
        ax.set_xlabel("step", fontsize=7)
    every = max(1, -(-len(names) // MAX_HEATMAP_LABELS))
    axes[0].set_yticks(range(0, len(names), every))
    axes[0].set_yticklabels([short_name(n) for n in names[::every]], fontsize=6)
    fig.colorbar(image, ax=list(axes), fraction=0.04, pad=0.02).set_label("log10 grad norm",
                                                                          fontsize=7)
    fig.text(0.5, 0.99, "per-layer gradient norm", ha="center", va="top", fontsize=9)
    fig.subplots_adjust(left=0.17, right=0.86, top=0.92, bottom=0.10, wspace=0.08)
    return fig


def agent_plot(records: list):
    """The Plot of the agent's own metrics (contract.AGENT_PREFIX keys) of a run, one panel each,
    or None."""
    keys = list(stats.agent_metrics(records))[:MAX_AGENT_PANELS]
    if not keys:
        return None
    return Plot(AGENT_PLOT, "the agent's own metrics", contract.STEP, "step",
                tuple(Panel(k, k) for k in keys))


def run_figure_jobs(runs: list) -> list:
    """[(file name, builder, args)] of one run's figures (first in `runs`) overlaid with the
    others."""
    jobs = [(plot.file, line_figure, (plot, runs)) for plot in PLOTS]
    # this run and the best: three panels are unreadable
    jobs.append((LAYER_HEATMAP, layer_heatmap, (runs[:2],)))
    agent = agent_plot(runs[0][1])
    if agent:
        jobs.append((agent.file, line_figure, (agent, runs)))
    return jobs


def run_figures(runs: list) -> dict:
    """{file name: Figure}, built in this process (for inspection; `render` builds and saves
    them)."""
    return {name: builder(*args) for name, builder, args in run_figure_jobs(runs)}


def render(jobs: list):
    """Build and save [(path, builder, args)] in this process."""
    for path, builder, args in jobs:
        save(builder(*args), path)


def render_in_background(jobs: list):
    """Start drawing [(path, builder, args)] in a forked process and return a function that waits
    for it. Drawing is CPU-bound and single-threaded, and a run's analysis has a time budget: the
    caller computes statistics meanwhile. Inline where fork is unavailable. The function returns
    None, or the one line of a failed write (a full disk: the figures are the run's least part,
    and the next analyze.py draws the missing ones); any other failure raises, unless check=False
    (the caller is failing already and only needs the process gone)."""
    if not hasattr(os, "fork"):
        failure = render_noting(jobs)
        return lambda check=True: failure
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: draw, report failure through the exit code, never return into the caller
        os.close(read_end)
        try:
            render(jobs)
        except OSError as e:  # one line for the parent to show, no traceback
            os.write(write_end, write_failure(e).encode())
            os._exit(WRITE_FAILED)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    os.close(write_end)

    def wait(check: bool = True):
        status = os.waitpid(pid, 0)[1]
        with os.fdopen(read_end, "rb") as pipe:
            failure = pipe.read().decode()
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == WRITE_FAILED:
            return failure
        if check and status != 0:
            raise HarnessError(f"the plotting process failed (exit status {status}; traceback "
                               f"above): the analysis and the ledger row are written, some plots "
                               f"may be missing")
        return None
    return wait


def render_noting(jobs: list):
    """render(jobs), where a failed write is the one line it returns (None when all were
    written)."""
    try:
        render(jobs)
    except OSError as e:
        return write_failure(e)
    return None


def write_failure(e: OSError) -> str:
    """A failed figure write in one line: the file, the cause, the filesystem and its free
    space."""
    path = Path(e.filename or ".").resolve()
    disk = next((p for p in (path, *path.parents) if p.exists() and os.path.ismount(p)), Path("/"))
    free = shutil.disk_usage(disk).free
    return (f"{e.filename or 'a figure'} could not be written ({e.strerror or e}; the filesystem "
            f"at {disk} has {free / 2**20:.0f} MB free)")


def progress_figure(ledger: list):
    """Every run's val_bpb in ledger order: kept runs highlighted, failures marked, the running best
    (lowest kept val_bpb so far) as a step line, and each kept run that lowered it labelled with its
    description."""
    fig = new_figure(figsize=(10, 4.5), dpi=DPI)
    ax = fig.subplots()
    index = np.arange(1, len(ledger) + 1)
    # failed and invalid runs are marked with a cross, never drawn at a number that does not count
    values = np.array([r["val_bpb"] if verdict.finished(r) else np.nan for r in ledger],
                      dtype=float)
    kept = np.array([r.get("status") == "keep" for r in ledger], dtype=bool)
    failed = np.isnan(values)
    ax.scatter(index[~kept & ~failed], values[~kept & ~failed], s=14, color="tab:gray", alpha=0.6,
               label="run")
    ax.scatter(index[kept], values[kept], s=40, color="tab:green", zorder=3, label="kept")
    finite = values[~failed]
    if failed.any():
        floor = np.nanmax(finite) if len(finite) else 0.0
        invalid = " / invalid" if any(r.get("status") == "invalid" for r in ledger) else ""
        ax.scatter(index[failed], np.full(failed.sum(), floor), marker="x", color="tab:red",
                   label=f"crash / nan / timeout{invalid}")
    best = np.minimum.accumulate(np.where(kept, values, np.inf))
    shown = np.isfinite(best)
    if shown.any():
        ax.step(index[shown], best[shown], where="post", color="tab:green", lw=1.2,
                label="running best")
    # the kept runs that lowered the line
    new_best = kept & (values <= np.concatenate(([np.inf], best[:-1])))
    for i in np.flatnonzero(new_best)[-MAX_PROGRESS_LABELS:]:
        text = (ledger[i].get("description") or ledger[i]["run_id"])[:MAX_PROGRESS_LABEL]
        ax.annotate(text, (index[i], values[i]), xytext=(4, 6), textcoords="offset points",
                    fontsize=6, rotation=20, color="darkgreen")
    ax.set_xlabel("run", fontsize=8)
    ax.set_ylabel("val bpb", fontsize=8)
    _title(ax, f"progress: {len(ledger)} runs, {int(kept.sum())} kept", size=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.92, bottom=0.12)
    return fig


def save(fig, path):
    """Save atomically (a reader never sees half a PNG)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    contract.atomic_write(path, buf.getvalue(), mode="wb")
