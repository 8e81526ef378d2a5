"""
The noise estimate and the verdict on a run: keep, rerun, discard or crash (pure functions).

One 5-minute run is noisy: a new seed alone moves val_bpb. The noise is measured from repeated runs
of the same train.py (SEED=... uv run train.py), pooled over every such group, and a candidate is
kept only when it beats the best by more than that noise allows. Candidates that look better but
are within the noise are rerun with another seed and re-decided on all their runs pooled.
"""

import math
import warnings

import numpy as np

import schema

# ---------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------

# A keep needs the improvement to be unlikely under the noise alone: a one-sided test of the
# difference of pooled means, Student's t with the noise estimate's degrees of freedom (a normal z
# under the fallback noise), below KEEP_ALPHA. 0.01 rather than the textbook 0.05 because a candidate
# may be looked at up to MAX_RUNS_PER_CANDIDATE times (rerun, re-decide): the chance that a change with
# no effect is ever kept stays small (simulated in tests/test_verdict.py) instead of growing per look.
KEEP_ALPHA = 0.01
# With repeats on both sides, the one-sided Welch t-test (unequal variances) must agree as well.
KEEP_P_VALUE = 0.05
# The pooled noise estimate is trusted from 2 degrees of freedom on (the baseline run three times).
MIN_NOISE_DF = 2
# Without that, the noise is assumed to be this fraction of the best val_bpb: on purpose much larger
# than the seed-to-seed spread of a healthy 5-minute run, so that only large gains are kept unmeasured.
FALLBACK_NOISE_FRACTION = 0.005
# The noise σ used in a verdict is never below this fraction of the best val_bpb: runs that agree to the
# last digit (a deterministic computation) would otherwise make any difference, however tiny,
# "significant" (p = 0). 2e-4 is below the seed-to-seed spread of a 5-minute GPU run (about 1e-3) and of
# the CPU configuration, so it only ever binds on estimates that collapsed.
NOISE_FLOOR_FRACTION = 2e-4
# A candidate still within the noise after this many runs is discarded: any effect it has is too
# small to resolve at the price of more 5-minute runs.
MAX_RUNS_PER_CANDIDATE = 4

VERDICTS = ("keep", "rerun", "discard", "crash")
FAILED_STATUSES = ("crash", "nan", "timeout")   # train.py's failure statuses, kept as the ledger status
NOT_COUNTED = FAILED_STATUSES + ("invalid",)     # never pooled, never the best


# ---------------------------------------------------------------------------
# Groups of runs in the ledger
# ---------------------------------------------------------------------------

def code_key(record: dict):
    """Runs of the same train.py (same sha256 of what ran) are repeats: their val_bpb are pooled."""
    return record.get("train_sha256") or record.get("commit")


def comparable_key(record: dict) -> tuple:
    """Only runs on the same device, budget, harness and data are compared or pooled."""
    return (record.get("device"), record.get("time_budget_s"), record.get("harness_hash"),
            (record.get("data") or {}).get("manifest_hash"))


POOL_PARTS = ("device", "budget", "harness", "data")  # what comparable_key is made of, in its order


def pool_changes(record: dict, reference: dict) -> list:
    """What puts `record` in another pool than `reference`, e.g. ["device 'NVIDIA H100 80GB HBM3' -> 'cpu'"]."""
    return [f"{name} {old!r} -> {new!r}" for name, old, new in
            zip(POOL_PARTS, comparable_key(reference), comparable_key(record)) if old != new]


def finished(record: dict) -> bool:
    return record.get("status") not in NOT_COUNTED and schema.finite_number(record.get("val_bpb"))


def pools(ledger: list, comparable: tuple) -> dict:
    """{code key: [finished records]} of the runs comparable with `comparable`, in ledger order. Only
    distinct seeds are repeats: a later run of the same code under the same SEED measures nothing new (on
    a deterministic device it is the same number again), so only the first run of each seed counts."""
    groups, seen = {}, set()
    for record in ledger:
        if finished(record) and comparable_key(record) == comparable:
            if (code_key(record), record.get("seed")) not in seen:
                seen.add((code_key(record), record.get("seed")))
                groups.setdefault(code_key(record), []).append(record)
    return groups


def same_seed_run(ledger: list, record: dict):
    """The earlier finished, comparable run of the same code under the same seed as `record`, or None."""
    return next((r for r in ledger if finished(r) and r.get("run_id") != record.get("run_id")
                 and comparable_key(r) == comparable_key(record) and code_key(r) == code_key(record)
                 and r.get("seed") == record.get("seed")), None)


def next_seed(ledger: list, record: dict) -> int:
    """A SEED this code has not run under yet (one above the highest it used), for the next repeat."""
    used = [r.get("seed") for r in ledger + [record] if code_key(r) == code_key(record)]
    return max([s for s in used if isinstance(s, int) and not isinstance(s, bool)], default=42) + 1


def best_pool(ledger: list, comparable: tuple):
    """(code key, records) of the kept code with the lowest pooled mean val_bpb, or None."""
    kept = [(float(np.mean([r["val_bpb"] for r in records])), key, records)
            for key, records in pools(ledger, comparable).items()
            if any(r.get("status") == "keep" for r in records)]
    if not kept:
        return None
    _, key, records = min(kept, key=lambda t: t[0])
    return key, records


def revert_target(ledger: list, record: dict):
    """(code key, records) of the best a discard of `record` reverts to: the best among the runs comparable
    with it, or, where there is none (a crash that never recorded its device, an invalid run on another
    harness, a run on a new device), the store's current best, the best among the runs comparable with
    the latest kept one. None when nothing is kept."""
    own = best_pool(ledger, comparable_key(record)) if finished(record) else None
    return own or best_pool(ledger, store_comparable(ledger))


def store_comparable(ledger: list):
    """The pool of the store's current best: the latest kept run's, else the latest finished run's."""
    kept = [r for r in ledger if r.get("status") == "keep"]
    reference = kept[-1] if kept else next((r for r in reversed(ledger) if finished(r)), ledger[-1] if ledger else None)
    return comparable_key(reference) if reference else None


def noise_estimate(groups) -> dict:
    """Pooled within-group standard deviation of val_bpb over groups of repeated runs of the same code.

    `groups` is an iterable of lists of val_bpb; groups with one run carry no information. The pooled
    variance is sum((n_i - 1) s_i^2) / sum(n_i - 1), with that sum as its degrees of freedom."""
    ss, df, used = 0.0, 0, 0
    for values in groups:
        values = np.asarray(values, float)
        if len(values) >= 2:
            ss += float(((values - values.mean()) ** 2).sum())
            df += len(values) - 1
            used += 1
    if df == 0:
        return {"sigma": None, "df": 0, "n_groups": 0, "trusted": False}
    return {"sigma": math.sqrt(ss / df), "df": df, "n_groups": used, "trusted": df >= MIN_NOISE_DF}


KILLED_MARK = "terminated by SIGTERM"  # train.py's crash error when a signal from outside ended it (prepare.RunLogger)


def decide(candidate, best=None, noise=None, failed: str = None, same_as_best: bool = False,
           error: str = None, new_pool: list = None, repeats_seed_of: str = None) -> dict:
    """The verdict on a candidate, with every number behind it.

    candidate: val_bpb of every finished run of the candidate's code (this run included).
    best: val_bpb of every finished run of the best code, or None when nothing is kept yet.
    noise: noise_estimate() over the comparable runs; failed: the run's failure status, if any
    ("invalid": it broke metric integrity, see analysis/integrity.py, and is discarded).
    same_as_best: the candidate *is* the best's code (a repeat): it is pooled into the best.
    error: a failed run's error line; a run killed from outside is told apart from a bug in its code.
    new_pool: with no best in the candidate's pool, what sets it apart from the kept runs (pool_changes):
    such a run is never a silent new baseline. repeats_seed_of: the run id of an earlier run of the same code
    under the same SEED (same_seed_run): this run measured nothing new and is not pooled."""
    from scipy import stats  # here, not at the top: see analysis/stats.py
    if failed == "invalid":
        return {"verdict": "discard", "reason": "INVALID: the evaluation harness, the prepared data or the training "
                                                "clock does not check out, so this val_bpb is never kept, pooled or "
                                                "counted as the best"}
    if failed == "crash" and error and KILLED_MARK in error:
        return {"verdict": "crash", "reason": "KILLED from outside (a tool or supervisor timeout, or a stop), not by "
                                              "an error in train.py: the idea is untested; give the run enough time "
                                              "(program.md) and run it again"}
    if failed:
        return {"verdict": "crash", "reason": f"the run ended with status {failed}: there is no val_bpb to judge"}
    if repeats_seed_of:
        return {"verdict": "rerun", "reason": f"the same train.py already ran under this SEED (run {repeats_seed_of}): "
                                              f"a repeat measures noise only under another seed, so this run is not "
                                              f"pooled; run it again with a new SEED"}
    candidate = np.asarray(candidate, float)
    out = {"n_candidate": len(candidate), "candidate_mean": float(candidate.mean())}
    if (best is None or len(best) == 0) and new_pool:
        return {**out, "verdict": "discard",
                "reason": f"NEW POOL: not comparable with the kept runs ({'; '.join(new_pool)}), so not kept; if "
                          f"that change is meant, start a new baseline: `uv run analyze.py keep --new-baseline`"}
    if best is None or len(best) == 0:
        return {**out, "verdict": "keep", "reason": "no best yet: this run becomes the baseline"}
    if same_as_best:
        return {**out, "verdict": "keep",
                "reason": f"same train.py as the best: a repeat, pooled into it ({len(candidate)} runs)"}
    best = np.asarray(best, float)
    best_mean = float(best.mean())
    noise = noise or noise_estimate([])
    if noise["trusted"]:
        sigma, df = noise["sigma"], noise["df"]
        sigma_source = f"pooled from repeats ({df} df)"
    else:
        sigma, df = FALLBACK_NOISE_FRACTION * best_mean, None
        sigma_source = (f"no noise estimate yet ({noise['df']} df < {MIN_NOISE_DF}): assumed "
                        f"{FALLBACK_NOISE_FRACTION:.1%} of the best val_bpb")
    if sigma < NOISE_FLOOR_FRACTION * best_mean:
        sigma = NOISE_FLOOR_FRACTION * best_mean
        sigma_source += f", raised to the floor of {NOISE_FLOOR_FRACTION:.2%} of the best val_bpb"
    delta = out["candidate_mean"] - best_mean
    se = sigma * math.sqrt(1 / len(candidate) + 1 / len(best))
    z = delta / se if se > 0 else (-math.inf if delta < 0 else math.inf if delta > 0 else 0.0)
    p_noise = float(stats.t.cdf(z, df) if df else stats.norm.cdf(z))  # one-sided: H1 candidate < best
    p_welch = None
    if len(candidate) >= 2 and len(best) >= 2:
        with warnings.catch_warnings():  # identical values: scipy warns and returns NaN, handled below
            warnings.simplefilter("ignore", RuntimeWarning)
            p = stats.ttest_ind(candidate, best, equal_var=False, alternative="less").pvalue
        p_welch = float(p) if np.isfinite(p) else None
    out.update(n_best=len(best), best_mean=best_mean, delta=delta, sigma=sigma, sigma_source=sigma_source,
               delta_sigma=delta / sigma if sigma > 0 else None, se=se, z=z, p_value=p_noise, p_welch=p_welch,
               keep_alpha=KEEP_ALPHA, keep_p_welch=KEEP_P_VALUE)
    p_text = f"p = {p_noise:.3g}" + (f", Welch p = {p_welch:.3g}" if p_welch is not None else "")
    if delta >= 0:
        return {**out, "verdict": "discard", "reason": f"not better than the best ({p_text})"}
    beyond_noise = p_noise < KEEP_ALPHA
    test_agrees = p_welch is None or p_welch < KEEP_P_VALUE
    if beyond_noise and test_agrees:
        return {**out, "verdict": "keep", "reason": f"better than the best beyond the noise ({p_text})"}
    why = (f"p = {p_noise:.3g} >= {KEEP_ALPHA}" if not beyond_noise else f"Welch p = {p_welch:.3g} >= {KEEP_P_VALUE}")
    if len(candidate) >= MAX_RUNS_PER_CANDIDATE:
        return {**out, "verdict": "discard",
                "reason": f"better than the best but still within the noise after {len(candidate)} runs ({why})"}
    return {**out, "verdict": "rerun",
            "reason": f"better than the best but within the noise ({why}): run it again with another SEED"}
