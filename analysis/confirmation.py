"""
The end-of-night confirmation's numbers (night/confirm.py runs it): the night's best and its
starting baseline run again under fresh SEEDs the night never used, pair k of both under one seed,
and the gain the morning report headlines is the mean paired difference, with its interval (issue
21, item 6): confirmed_gain, a pure function; describe, its one line; load, the store's record.

The in-night gain is optimistic: the best is the luckiest of many runs (+0.77 mbpb at sigma 0.0013
in bench/night_sim.py). Runs under seeds the night never saw carry none of that selection, so their
difference is an unbiased estimate of the true gain.
"""

import json

import numpy as np

from analysis.store import CONFIRMATION_FILE
from harness.contract import HarnessError

# the interval the morning report prints: two-sided 95 %
CONFIRM_LEVEL = 0.95


def confirmed_gain(best_values, baseline_values, sigma=None, df=None, rho=None,
                   level: float = CONFIRM_LEVEL) -> dict:
    """The confirmed gain of the best over the baseline from K paired runs.

    best_values[k] and baseline_values[k]: val_bpb of the best's and the baseline's runs under the
    k-th fresh seed (same length K >= 1; arrays of shape (..., K) give one answer per leading index,
    as bench/night_sim.py uses it). The gain is baseline - best (positive: the best is better),
    estimate = its mean over the K pairs.

    The interval, estimate -/+ t * se at `level`:
    - sigma None: from the pairs' own spread, se = sd(differences, ddof 1) / sqrt(K), Student's t
      on K - 1 df (exact for normal noise, but wide for small K: t = 12.7 on 1 df); low and high
      are None (NaN for arrays) when K = 1;
    - sigma given (the night's pooled sigma of one run, on `df` degrees of freedom; 0 or None: the
      normal) and rho (the store's shrunk seed share, None: 0): se = sigma * sqrt(2 (1 - rho) / K),
      the standard error of a mean paired difference under the seed model of analysis/pairing.py.
      A shrunk rho errs toward a wider interval.

    Returns {"estimate", "low", "high", "se", "df", "n", "survived"} in val_bpb units; survived:
    the estimate is positive (the best's lead held on runs the night did not select it on).
    """
    from scipy import stats  # here, not at the top: see analysis/stats.py
    best, baseline = np.asarray(best_values, float), np.asarray(baseline_values, float)
    if best.shape != baseline.shape or best.ndim == 0 or best.shape[-1] < 1:
        raise ValueError("confirmed_gain needs as many baseline runs as best runs, at least 1")
    k = best.shape[-1]
    gain = baseline - best
    estimate = gain.mean(axis=-1)
    q = 1 - (1 - level) / 2
    if sigma is None:
        dof = np.full(np.shape(estimate), k - 1)
        if k >= 2:
            se = gain.std(axis=-1, ddof=1) / np.sqrt(k)
            half = stats.t.ppf(q, k - 1) * se
        else:
            se = half = np.full(np.shape(estimate), np.nan)
    else:
        share = np.zeros(np.shape(estimate)) if rho is None else np.asarray(rho, float)
        se = np.asarray(sigma, float) * np.sqrt(2 * (1 - share) / k)
        dof = np.asarray(0 if df is None else df, float)
        half = np.where(dof > 0, stats.t.ppf(q, np.maximum(dof, 1)), stats.norm.ppf(q)) * se
    low, high = estimate - half, estimate + half
    if np.ndim(estimate) == 0:  # one confirmation: plain numbers for the report
        def plain(x):
            return None if not np.isfinite(x) else float(x)
        return {"estimate": float(estimate), "low": plain(low), "high": plain(high),
                "se": plain(se), "df": float(dof), "n": k, "survived": bool(estimate > 0)}
    return {"estimate": estimate, "low": low, "high": high, "se": se, "df": dof, "n": k,
            "survived": estimate > 0}


MBPB = 1000.0  # the report's unit: 0.001 val_bpb


def describe(record: dict) -> str:
    """One line for status.log, `analyze.py status` and the morning report's headline."""
    night = (f"in-night gain {record['in_night_gain'] * MBPB:+.2f} mbpb; the night of "
             f"{record['night_started_at']}")
    result = record.get("result")
    if result is None:
        return f"confirmation: no pair of runs finished ({night})"
    interval = ("" if result["low"] is None else
                f" (95 % CI {result['low'] * MBPB:+.2f} .. {result['high'] * MBPB:+.2f})")
    verdict_text = ("the best's lead survived" if result["survived"]
                    else "the best's lead did NOT survive")
    return (f"confirmation: gain {result['estimate'] * MBPB:+.2f} mbpb{interval} on "
            f"{result['n']} fresh seed(s), {night}: {verdict_text}")


def load(store) -> dict:
    """The store's latest confirmation record, or None; one that cannot be read is an error."""
    path = store.path(CONFIRMATION_FILE)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise HarnessError(f"{path} is not JSON ({e}): remove it; the next night's "
                           f"confirmation writes it again") from None
