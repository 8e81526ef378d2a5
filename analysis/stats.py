"""
Trajectory statistics of one run (and of one run against another), as pure functions.

Inputs are the records of metrics.jsonl (see contract.py) or numpy arrays taken from them; outputs
are plain dicts that report.py renders. Nothing here reads files, plots or decides a verdict.
"""

import re

import numpy as np

from harness import contract

# scipy is imported inside the functions that use it: analyze.py draws its plots in a forked process
# while this one imports scipy and computes, so neither waits for the other's imports.

# ---------------------------------------------------------------------------
# Thresholds (named so a reader can find and question them)
# ---------------------------------------------------------------------------

# the "tail" is the last 20 % of steps: late enough to be past warmup, long enough to fit
TAIL_FRACTION = 0.2
# one-sided p of a negative tail slope below this: the run was still improving
IMPROVING_P_VALUE = 0.05
# fewer steps than this: no tail slope or power-law fit (too noisy to mean anything)
MIN_FIT_POINTS = 20
# "what a longer budget would reach": the fitted curve at twice the steps
EXTRAPOLATE_FACTOR = 2.0
SPIKE_WINDOW = 50            # trailing steps whose median / MAD define "normal" for the spike test
# robust z-score of a loss spike; ~0 false alarms per run on Gaussian-like noise
SPIKE_Z = 6.0
SPIKE_MERGE_STEPS = 5        # spikes closer than this are one event
# recovered: the loss is back within 2 robust sd of the pre-spike median
SPIKE_RECOVERED_Z = 2.0
# smoothing window for the divergence test, as a fraction of the shared steps
DIVERGENCE_SMOOTH_FRACTION = 0.02
DIVERGENCE_Z = 3.0           # the smoothed gap must exceed 3 standard errors of smoothed noise ...
# ... and this many nats/token, so identical runs never "diverge" by rounding
DIVERGENCE_MIN_GAP = 0.002
# ... and stay beyond both until the end for at least 5 % of the shared steps
DIVERGENCE_MIN_SUSTAIN = 0.05
LAYER_OUTLIER_Z = 3.0        # robust z (median / MAD over layers, log scale) of an outlier layer
# ... and at least 2x off the typical layer: near-identical layers have a tiny MAD
LAYER_OUTLIER_RATIO = 2.0
MIN_LAYERS_FOR_OUTLIERS = 3  # a median over fewer layers says nothing
# a weight norm that grew or shrank by this factor over the run is reported
NORM_CHANGE_FLAG = 2.0
# drift is measured from a quarter into the run, past the initial transient
DRIFT_SKIP_FRACTION_INV = 4
MAD_TO_SD = 1.4826           # MAD of a normal distribution times this is its standard deviation


# ---------------------------------------------------------------------------
# Records -> arrays
# ---------------------------------------------------------------------------

def series(records: list, key: str, x_key: str = contract.STEP):
    """(x, y) float arrays of the records that carry `key` (periodic keys are on some steps
    only)."""
    pairs = [(r[x_key], r[key]) for r in records if key in r and x_key in r]
    if not pairs:
        return np.empty(0), np.empty(0)
    x, y = np.array(pairs, dtype=float).T
    return x, y


def timed_steps(records: list, warmup_steps: int = 0) -> list:
    """The records on the training clock: clock-warmup (compilation) steps are excluded."""
    return [r for r in records if r.get(contract.STEP, -1) >= warmup_steps]


def agent_metrics(records: list) -> dict:
    """{key: {points, first, last, min, max, last_step}} of the agent's own metrics
    (contract.AGENT_PREFIX keys)."""
    found = {}
    for r in records:
        for key, value in r.items():
            if (isinstance(key, str) and key.startswith(contract.AGENT_PREFIX)
                    and contract.finite_number(value)):
                found.setdefault(key, []).append((r.get(contract.STEP), value))
    return {key: {"points": len(points), "first": points[0][1], "last": points[-1][1],
                  "min": min(v for _, v in points), "max": max(v for _, v in points),
                  "last_step": points[-1][0]}
            for key, points in sorted(found.items())}


def layer_table(records: list):
    """{param name: {stat: (steps, values)}} from the per-layer keys of metrics.jsonl."""
    table = {}
    for r in records:
        for key, value in r.items():
            parsed = contract.parse_layer_key(key)
            if parsed:
                name, stat = parsed
                table.setdefault(name, {}).setdefault(stat, ([], []))
                table[name][stat][0].append(r[contract.STEP])
                table[name][stat][1].append(value)
    return {name: {stat: (np.array(s, dtype=float), np.array(v, dtype=float))
                   for stat, (s, v) in by_stat.items()}
            for name, by_stat in table.items()}


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------

def tail_slope(steps, loss, fraction: float = TAIL_FRACTION) -> dict:
    """Least-squares slope of the loss over the last `fraction` of the steps, and whether it is
    significantly negative (the run was still improving when the budget ran out)."""
    steps, loss = np.asarray(steps, float), np.asarray(loss, float)
    n_tail = int(round(len(steps) * fraction))
    if n_tail < MIN_FIT_POINTS:
        return {"ok": False, "reason": f"only {n_tail} tail steps (need {MIN_FIT_POINTS})"}
    from scipy import stats
    x, y = steps[-n_tail:], loss[-n_tail:]
    fit = stats.linregress(x, y)
    t = fit.slope / fit.stderr if fit.stderr > 0 else (-np.inf if fit.slope < 0 else np.inf)
    p_decreasing = float(stats.t.cdf(t, df=n_tail - 2))  # one-sided: H1 slope < 0
    span = x[-1] - x[0]
    return {"ok": True, "slope": float(fit.slope), "stderr": float(fit.stderr),
            "p_value": p_decreasing,
            "improving": bool(fit.slope < 0 and p_decreasing < IMPROVING_P_VALUE),
            "from_step": int(x[0]), "to_step": int(x[-1]), "n": n_tail,
            "change_over_tail": float(fit.slope * span), "mean": float(y.mean())}


def _power_law(x, l_inf, a, alpha):
    return l_inf + a * np.power(x, -alpha)


def fit_power_law(steps, loss, extrapolate_factor: float = EXTRAPOLATE_FACTOR) -> dict:
    """Fit L(s) = L_inf + A * s^-alpha (a saturating power law) by least squares.

    Returns the parameters, R^2, and the fitted loss at the last step and at `extrapolate_factor`
    times the steps (an estimate of what a longer budget would reach, schedule effects aside)."""
    steps, loss = np.asarray(steps, float), np.asarray(loss, float)
    keep = np.isfinite(loss) & (steps >= 0)
    x, y = steps[keep] + 1.0, loss[keep]
    if len(x) < MIN_FIT_POINTS:
        return {"ok": False, "reason": f"only {len(x)} steps (need {MIN_FIT_POINTS})"}
    y_min, y_span = float(y.min()), float(np.ptp(y))
    if y_span <= 0:
        return {"ok": False, "reason": "the loss is constant"}
    from scipy import optimize
    p0 = (max(y_min - 0.1 * y_span, 0.0), y_span * x[0] ** 0.5, 0.5)
    try:
        params, _ = optimize.curve_fit(_power_law, x, y, p0=p0,
                                       bounds=([0.0, 0.0, 1e-3], [y_min, np.inf, 5.0]),
                                       maxfev=5000)
    except (RuntimeError, ValueError) as e:
        # no convergence: report it, the other statistics still stand
        return {"ok": False, "reason": f"the fit did not converge ({e})"}
    fitted = _power_law(x, *params)
    ss_res, ss_tot = float(((y - fitted) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    last = float(x[-1])
    return {"ok": True, "l_inf": float(params[0]), "a": float(params[1]), "alpha": float(params[2]),
            "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0,
            "at_last": float(_power_law(last, *params)),
            "extrapolate_factor": extrapolate_factor,
            "at_extrapolated": float(_power_law(last * extrapolate_factor, *params))}


def _trailing_robust_z(values, window: int):
    """z of each point against the median and MAD of the `window` points before it (NaN before
    that)."""
    values = np.asarray(values, float)
    z = np.full(len(values), np.nan)
    if len(values) <= window:
        return z, z.copy(), z.copy()
    # windows[i] precedes values[i+window]
    windows = np.lib.stride_tricks.sliding_window_view(values[:-1], window)
    med = np.median(windows, axis=1)
    mad = np.median(np.abs(windows - med[:, None]), axis=1) * MAD_TO_SD
    scale = np.maximum(mad, 1e-8 + 1e-6 * np.abs(med))
    z[window:] = (values[window:] - med) / scale
    center = np.full(len(values), np.nan)
    center[window:] = med
    spread = np.full(len(values), np.nan)
    spread[window:] = scale
    return z, center, spread


def loss_spikes(steps, loss, window: int = SPIKE_WINDOW, z_threshold: float = SPIKE_Z) -> list:
    """Loss-spike events: steps whose loss is `z_threshold` robust standard deviations above the
    trailing window's median. Nearby spike steps are merged into one event; each event says how
    many steps the loss took to return within SPIKE_RECOVERED_Z robust sd of the pre-spike median
    (None: not within the run)."""
    steps, loss = np.asarray(steps, float), np.asarray(loss, float)
    window = max(5, min(window, len(loss) // 5))
    z, center, spread = _trailing_robust_z(loss, window)
    hits = np.flatnonzero(np.nan_to_num(z, nan=0.0) > z_threshold)
    events = []
    for i in hits:
        if events and i - events[-1]["last_index"] <= SPIKE_MERGE_STEPS:
            event = events[-1]
            event["last_index"] = int(i)
            if z[i] > event["z"]:
                event.update(step=int(steps[i]), loss=float(loss[i]), z=float(z[i]))
            continue
        events.append({"step": int(steps[i]), "first_index": int(i), "last_index": int(i),
                       "loss": float(loss[i]), "baseline": float(center[i]),
                       "normal_max": float(center[i] + SPIKE_RECOVERED_Z * spread[i]),
                       "z": float(z[i])})
    for event in events:
        after = np.flatnonzero(loss[event["last_index"] + 1:] <= event.pop("normal_max"))
        event["recovered_after"] = (int(after[0] + 1 + event["last_index"] - event["first_index"])
                                    if len(after) else None)
    return [{k: v for k, v in e.items() if not k.endswith("_index")} for e in events]


def step_time_stats(step_ms) -> dict:
    """Distribution of the per-step wall time (timed steps only)."""
    ms = np.asarray(step_ms, float)
    if len(ms) == 0:
        return {"ok": False, "reason": "no timed steps"}
    median = float(np.median(ms))
    return {"ok": True, "median_ms": median, "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)), "max_ms": float(ms.max()),
            "cv": float(ms.std() / ms.mean()) if ms.mean() > 0 else 0.0,
            "slow_steps": int((ms > 2 * median).sum()), "n": len(ms)}


def train_val_gap(records: list) -> list:
    """At every validation point: val loss minus smoothed train loss (nats/token; positive = val
    worse)."""
    rows = []
    for r in records:
        if contract.VAL_BPB in r:
            gap = (r[contract.VAL_LOSS] - r[contract.TRAIN_LOSS_SMOOTH]
                   if contract.VAL_LOSS in r else None)
            rows.append({"step": r[contract.STEP], "time_s": r[contract.TIME_S],
                         "val_bpb": r[contract.VAL_BPB], "val_loss": r.get(contract.VAL_LOSS),
                         "train_loss_smooth": r[contract.TRAIN_LOSS_SMOOTH], "gap": gap})
    return rows


# ---------------------------------------------------------------------------
# Per-layer statistics
# ---------------------------------------------------------------------------

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_kind(name: str):
    """(kind, layer index) of a parameter name: blocks.3.attn.c_q.weight ->
    (blocks.*.attn.c_q.weight, 3)."""
    m = _LAYER_INDEX.search(name)
    if not m:
        return name, None
    return name[:m.start()] + ".*." + name[m.end():], int(m.group(1))


def _robust_z(values):
    values = np.asarray(values, float)
    med = np.median(values)
    mad = np.median(np.abs(values - med)) * MAD_TO_SD
    return (values - med) / max(mad, 1e-6 * max(abs(med), 1.0))


def layer_findings(table: dict) -> dict:
    """Outlier layers and weight-norm drift from layer_table().

    Outliers compare the same matrix across layers (blocks.*.mlp.c_fc.weight over every block),
    on the log of its median over the run, so different shapes are never compared with each other.
    Drift is each parameter's weight norm at its last measurement over the one a quarter into the
    run (zero-initialised projections grow by orders of magnitude at first; that is not drift)."""
    kinds = {}
    for name in table:
        kind, index = layer_kind(name)
        if index is not None:
            kinds.setdefault(kind, []).append((index, name))
    outliers, too_few = [], []
    for kind, members in sorted(kinds.items()):
        if len(members) < MIN_LAYERS_FOR_OUTLIERS:
            too_few.append(kind)
            continue
        members.sort()
        for stat in ("grad_norm", "update_ratio"):
            medians = [np.median(table[name][stat][1]) if stat in table[name] else np.nan
                       for _, name in members]
            if not np.all(np.isfinite(medians)) or min(medians) <= 0:
                continue
            z = _robust_z(np.log10(medians))
            typical = float(np.median(medians))
            for (index, name), value, zi in zip(members, medians, z):
                ratio = value / typical
                if abs(zi) > LAYER_OUTLIER_Z and max(ratio, 1 / ratio) >= LAYER_OUTLIER_RATIO:
                    outliers.append({"name": name, "layer": index, "stat": stat,
                                     "value": float(value), "typical": typical,
                                     "ratio": float(ratio), "z": float(zi)})
    drift = []
    for name, by_stat in sorted(table.items()):
        if "weight_norm" not in by_stat or len(by_stat["weight_norm"][1]) < 2:
            continue
        steps, values = by_stat["weight_norm"]
        start = len(values) // DRIFT_SKIP_FRACTION_INV
        first, last = float(values[start]), float(values[-1])
        if first > 0 and start < len(values) - 1:
            ratio = last / first
            drift.append({"name": name, "from_step": int(steps[start]), "first": first,
                          "last": last, "ratio": ratio,
                          "flag": bool(ratio >= NORM_CHANGE_FLAG or ratio <= 1 / NORM_CHANGE_FLAG)})
    return {"outliers": outliers, "kinds_with_too_few_layers": too_few, "drift": drift,
            "n_params": len(table)}


# ---------------------------------------------------------------------------
# Two runs
# ---------------------------------------------------------------------------

def _moving_average(y, window: int):
    """Centred moving average; the window shrinks at the ends instead of repeating the edge
    values."""
    y = np.asarray(y, float)
    if window <= 1:
        return y
    kernel = np.ones(window)
    return np.convolve(y, kernel, mode="same") / np.convolve(np.ones(len(y)), kernel, mode="same")


def noise_sd(y) -> float:
    """Standard deviation of the step-to-step noise of a curve, robust to its trend and to spikes:
    from the median absolute first difference (a difference of two noisy points has sqrt(2) x the
    sd)."""
    d = np.diff(np.asarray(y, float))
    if len(d) == 0:
        return 0.0
    return float(MAD_TO_SD * np.median(np.abs(d - np.median(d))) / np.sqrt(2))


def divergence(steps_a, loss_a, steps_b, loss_b) -> dict:
    """Where run A's loss curve separated from run B's (B is usually the best run).

    Both curves are compared on A's steps within the shared range, B interpolated onto them, after a
    moving average. The gap counts once it exceeds both the noise of the smoothed curves and
    DIVERGENCE_MIN_GAP and then stays beyond them, on the same side, to the end of the shared range.
    `separated_at` is the last step before that where the gap was on the other side or zero: where
    the curves began to part. Negative gaps mean A is lower (better)."""
    sa, la = np.asarray(steps_a, float), np.asarray(loss_a, float)
    sb, lb = np.asarray(steps_b, float), np.asarray(loss_b, float)
    if len(sa) < MIN_FIT_POINTS or len(sb) < MIN_FIT_POINTS:
        return {"ok": False, "reason": "too few steps to compare"}
    lo, hi = max(sa[0], sb[0]), min(sa[-1], sb[-1])
    shared = (sa >= lo) & (sa <= hi)
    if shared.sum() < MIN_FIT_POINTS:
        return {"ok": False, "reason": "the runs share too few steps"}
    x, ya = sa[shared], la[shared]
    yb = np.interp(x, sb, lb)
    window = max(3, int(len(x) * DIVERGENCE_SMOOTH_FRACTION))
    sma, smb = _moving_average(ya, window), _moving_average(yb, window)
    gap = sma - smb
    noise = np.sqrt((noise_sd(ya) ** 2 + noise_sd(yb) ** 2) / window)  # sd of the smoothed gap
    threshold = max(DIVERGENCE_Z * noise, DIVERGENCE_MIN_GAP)
    final_gap = float(gap[-max(1, len(gap) // 10):].mean())
    result = {"ok": True, "shared_steps": int(len(x)), "threshold": float(threshold),
              "final_gap": final_gap, "max_gap": float(gap[np.argmax(np.abs(gap))]),
              "x": x, "gap": gap}
    side = np.sign(gap[-1])
    beyond = (np.abs(gap) > threshold) & (np.sign(gap) == side)
    if not beyond[-1]:
        return {**result, "diverged": False}
    inside = np.flatnonzero(~beyond)
    start = int(inside[-1] + 1) if len(inside) else 0
    if len(x) - start < max(2, DIVERGENCE_MIN_SUSTAIN * len(x)):
        return {**result, "diverged": False}
    other_side = np.flatnonzero(np.sign(gap[:start]) != side)
    parted = int(other_side[-1]) if len(other_side) else 0
    return {**result, "diverged": True, "separated_at": int(x[parted]),
            "beyond_noise_from": int(x[start]), "direction": "lower" if side < 0 else "higher"}
