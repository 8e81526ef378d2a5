"""
The noise estimate and the verdict on a run: keep, rerun, discard or crash (pure functions).

One 5-minute run is noisy: a new seed alone moves val_bpb. The noise is measured from repeated runs
of the same train.py (SEED=... uv run launch.py), pooled over every such group, and a candidate is
kept only when it beats the best by more than that noise allows, in a sequential test: a candidate
that looks better is rerun with another seed and re-decided on all its runs pooled while it stays
promising, and a gain is confirmed on several runs before it becomes the best (POLICIES,
bench/night_sim.py).
"""

import math
import warnings

import numpy as np

from harness import contract, settings

# ---------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------

# The pooled noise estimate is trusted from 2 degrees of freedom on (the baseline run three times).
MIN_NOISE_DF = 2
# Without that, the noise is assumed to be this fraction of the best val_bpb: on purpose much larger
# than the seed-to-seed spread of a healthy 5-minute run, so that only large gains are kept
# unmeasured.
FALLBACK_NOISE_FRACTION = 0.005
# The noise σ used in a verdict is never below this fraction of the best val_bpb: runs that agree
# to the last digit (a deterministic computation) would otherwise make any difference, however tiny,
# "significant" (p = 0). 2e-4 is below the seed-to-seed spread of a 5-minute GPU run (about 1e-3)
# and of the CPU configuration, so it only ever binds on estimates that collapsed.
NOISE_FLOOR_FRACTION = 2e-4

# ---------------------------------------------------------------------------
# The keep rule (issue 11): a sequential test, chosen with bench/night_sim.py (see BENCHMARKS.md)
# ---------------------------------------------------------------------------

# After every run of a candidate its pooled mean is compared with the best's: the one-sided p of the
# difference (Student's t on the noise's degrees of freedom). A policy says what p buys:
# - keep_alpha: kept once p < keep_alpha with at least confirm_runs runs (a confirmation: a gain
#   seen on one lucky run is run again before it becomes the best, which also makes the best's
#   value less optimistic);
# - strong_alpha: kept on fewer runs only when p is already below this (an unmistakable gain);
# - futility[n - 1]: after n runs, rerun only while p is below this bound; a candidate that merely
#   looks a little better is discarded instead of taking more 5-minute runs from the ideas still
#   waiting;
# - max_runs: discarded when still undecided after this many runs;
# - paired_alpha (optional, the single-run paired threshold of issue 21): also kept once p <
#   paired_alpha with at least paired_runs runs, when every run of the candidate has a run of the
#   best under the same SEED and the store's shrunk rho-hat is at least paired_rho
#   (paired_eligible); p is then that of the paired standard error (paired_se). Where the seed
#   carries most of the noise, a paired difference of one run is as informative as three unpaired
#   runs, so the confirmation's two extra runs go to new ideas instead.
# keep_alpha is larger than a textbook 0.05 on purpose: simulated nights (100 runs, the base prior)
# keep fewer than 1 idea without a real gain per night with it, because most no-op ideas stop at
# the first or second run (futility), and a looser screen buys more real gains than a stricter one
# (BENCHMARKS.md).
POLICIES = {
    # the default: validated's sequential test, plus the single-run paired threshold where the
    # store's own pairs show rho-hat >= 0.4 (pairing.store_share, shrunk toward 0 while few pairs
    # exist); p < 0.2 on the paired error. Chosen by simulation (BENCHMARKS.md, "Seed
    # noise"): at sigma 0.0013 it gains 17.7 / 20.0 mbpb a night at rho 0.6 / 0.88 (validated on
    # the paired error: 17.1 / 18.3) with <= 0.61 false keeps a night, and is validated itself
    # where the seed carries little noise;
    # paired_rho 0.3 gains a little more but passes 1 false keep at sigma 0.0003, rho 0.
    "paired": dict(keep_alpha=0.1, strong_alpha=0.001, confirm_runs=3,
                   futility=(0.2, 0.1, 0.05), max_runs=4,
                   paired_alpha=0.2, paired_rho=0.4, paired_runs=1),
    # the default before the paired threshold: every keep confirmed on 3 runs (unless p < 0.001);
    # at most ~1 false keep per night in every simulated cell, most of autoresearch's gain at low
    # noise
    "validated": dict(keep_alpha=0.1, strong_alpha=0.001, confirm_runs=3,
                      futility=(0.2, 0.1, 0.05), max_runs=4),
    # for a human who prefers gain over validated findings: more real gain at high noise, 1-3 false
    # keeps a night
    "gain": dict(keep_alpha=0.3, strong_alpha=0.001, confirm_runs=3,
                 futility=(0.2, 0.1, 0.05), max_runs=4),
}
assert tuple(POLICIES) == settings.POLICY_NAMES, (
    "a policy is named in harness/settings.py and defined here")
# Which policy decides: the human's call for the night, never the agent's ($AUTORESEARCH_VERDICT,
# fixed when the night starts; analyze.py records the mode in every ledger row); this one unless it
# is set.
VERDICT_MODE = settings.POLICY_NAMES[0]
VERDICT_ENV = settings.VERDICT_ENV
KEEP_ALPHA = POLICIES[VERDICT_MODE]["keep_alpha"]  # the default's, for reports and tests
MAX_RUNS_PER_CANDIDATE = POLICIES[VERDICT_MODE]["max_runs"]


KEEP_CODE, DISCARD_CODE, RERUN_CODE = 1, 2, 0  # sequential_verdict's answers


def one_sided_p(z, df):
    """P(T <= z) for Student's t with `df` degrees of freedom; the normal where df is 0 (arrays
    too)."""
    from scipy import stats
    z, df = np.asarray(z, float), np.asarray(df, float)
    return np.where(df > 0, stats.t.cdf(z, np.maximum(df, 1)), stats.norm.cdf(z))


def paired_eligible(n, shared, rho, policy: dict):
    """Whether a candidate with `n` runs, `shared` of them under a SEED the best also ran with, may
    be kept on the paired threshold of `policy` (paired_alpha): every one of its runs is paired,
    it has at least paired_runs runs, and the store's shrunk rho-hat is at least paired_rho (the
    data must show that the seed carries most of the noise before one run is trusted). Always
    False for a policy without a paired threshold. Vectorised, as sequential_verdict."""
    if policy.get("paired_alpha") is None:
        return np.zeros(np.shape(n), bool)
    rho = np.where(np.asarray(rho if rho is not None else 0.0, float) > 0, rho, 0.0)
    n, shared = np.asarray(n), np.asarray(shared)
    return (shared >= n) & (n >= policy["paired_runs"]) & (rho >= policy["paired_rho"])


def sequential_verdict(n, delta, se, df, policy: dict = None, shared=0, rho=None):
    """KEEP_CODE, DISCARD_CODE or RERUN_CODE for a candidate with `n` runs whose pooled mean differs
    from the best's by `delta` with standard error `se` (the noise's df `df`, 0 for the assumed
    noise). shared, rho: the seeds its runs share with the best's and the store's shrunk rho-hat
    (used only by a policy with a paired threshold, paired_eligible). Pure and vectorised: every
    argument may be an array (bench/night_sim.py decides thousands of nights at once)."""
    policy = POLICIES[VERDICT_MODE] if policy is None else policy
    n, delta, se = np.asarray(n), np.asarray(delta, float), np.asarray(se, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, delta / np.where(se > 0, se, 1.0), np.sign(delta) * np.inf)
    p = one_sided_p(z, df)
    better = delta < 0
    beyond = better & (p < policy["keep_alpha"])
    keep = beyond & ((n >= policy["confirm_runs"]) | (p < policy["strong_alpha"]))
    if policy.get("paired_alpha") is not None:
        keep = keep | (better & paired_eligible(n, shared, rho, policy)
                       & (p < policy["paired_alpha"]))
    bounds = np.asarray(tuple(policy["futility"]) + (0.0,), float)
    # an unconfirmed keep is always rerun
    promising = (p < bounds[np.clip(n - 1, 0, len(bounds) - 1)]) | beyond
    rerun = better & ~keep & promising & (n < policy["max_runs"])
    return np.where(keep, KEEP_CODE, np.where(rerun, RERUN_CODE, DISCARD_CODE))


VERDICTS = ("keep", "rerun", "discard", "crash")
# train.py's failure statuses, kept as the ledger status
FAILED_STATUSES = ("crash", "nan", "timeout")
NOT_COUNTED = FAILED_STATUSES + ("invalid",)  # never pooled, never the best


# ---------------------------------------------------------------------------
# Groups of runs in the ledger
# ---------------------------------------------------------------------------

def code_key(record: dict):
    """Runs of the same train.py (same sha256 of what ran) are repeats: their val_bpb are pooled."""
    return record.get("train_sha256") or record.get("commit")


def torch_release(version):
    """torch's major.minor ("2.15" of "2.15.0+cu132"): a release changes kernels and autocast rules
    (rms_norm in fp32 since 2.12), so runs under two releases are not repeats of each other."""
    return ".".join(version.split("+")[0].split(".")[:2]) if isinstance(version, str) else None


def comparable_key(record: dict) -> tuple:
    """Only runs on the same device, budget, harness, data and torch release are compared or
    pooled."""
    return (record.get("device"), record.get("time_budget_s"), record.get("harness_hash"),
            (record.get("data") or {}).get("manifest_hash"),
            torch_release(record.get("torch_version")))


# what comparable_key is made of, in order
POOL_PARTS = ("device", "budget", "harness", "data", "torch")


def pool_changes(record: dict, reference: dict) -> list:
    """What puts `record` in another pool than `reference`, e.g. ["device 'NVIDIA H100 80GB HBM3'
    -> 'cpu'"]."""
    return [f"{name} {old!r} -> {new!r}" for name, old, new in
            zip(POOL_PARTS, comparable_key(reference), comparable_key(record)) if old != new]


def finished(record: dict) -> bool:
    return record.get("status") not in NOT_COUNTED and contract.finite_number(record.get("val_bpb"))


def pools(ledger: list, comparable: tuple) -> dict:
    """{code key: [finished records]} of the runs comparable with `comparable`, in ledger order.
    Only distinct seeds are repeats: a later run of the same code under the same SEED measures
    nothing new (on a deterministic device it is the same number again), so only the first run of
    each seed counts."""
    groups, seen = {}, set()
    for record in ledger:
        if finished(record) and comparable_key(record) == comparable:
            if (code_key(record), record.get("seed")) not in seen:
                seen.add((code_key(record), record.get("seed")))
                groups.setdefault(code_key(record), []).append(record)
    return groups


def same_seed_run(ledger: list, record: dict):
    """The earlier finished, comparable run of the same code under the same seed as `record`, or
    None."""
    return next((r for r in ledger if finished(r) and r.get("run_id") != record.get("run_id")
                 and comparable_key(r) == comparable_key(record) and code_key(r) == code_key(record)
                 and r.get("seed") == record.get("seed")), None)


def next_seed(ledger: list, record: dict) -> int:
    """A SEED this code has not run under yet (one above the highest it used), for the next
    repeat."""
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
    """(code key, records) of the best a discard of `record` reverts to: the best among the runs
    comparable with it, or, where there is none (a crash that never recorded its device, an invalid
    run on another harness, a run on a new device), the store's current best, the best among the
    runs comparable with the latest kept one. None when nothing is kept."""
    own = best_pool(ledger, comparable_key(record)) if finished(record) else None
    return own or best_pool(ledger, store_comparable(ledger))


def store_comparable(ledger: list):
    """The pool of the store's current best: the latest kept run's, else the latest finished
    run's."""
    kept = [r for r in ledger if r.get("status") == "keep"]
    reference = kept[-1] if kept else next((r for r in reversed(ledger) if finished(r)),
                                           ledger[-1] if ledger else None)
    return comparable_key(reference) if reference else None


def noise_estimate(groups) -> dict:
    """Pooled within-group standard deviation of val_bpb over groups of repeated runs of the same
    code.

    `groups` is an iterable of lists of val_bpb; groups with one run carry no information. The
    pooled variance is sum((n_i - 1) s_i^2) / sum(n_i - 1), with that sum as its degrees of
    freedom."""
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


# train.py's crash error when a signal from outside ended it (the harness's run logger)
KILLED_MARK = "terminated by SIGTERM"


def decide(candidate, best=None, noise=None, failed: str = None, same_as_best: bool = False,
           error: str = None, new_pool: list = None, repeats_seed_of: str = None,
           policy: dict = None, shared_seeds: int = 0, rho: float = None) -> dict:
    """The verdict on a candidate, with every number behind it.

    candidate: val_bpb of every finished run of the candidate's code (this run included).
    best: val_bpb of every finished run of the best code, or None when nothing is kept yet.
    noise: noise_estimate() over the comparable runs; failed: the run's failure status, if any
    ("invalid": it broke metric integrity, see analysis/integrity.py, and is discarded).
    same_as_best: the candidate *is* the best's code (a repeat): it is pooled into the best.
    error: a failed run's error line; a run killed from outside is told apart from a bug in its
    code. new_pool: with no best in the candidate's pool, what sets it apart from the kept runs
    (pool_changes): such a run is never a silent new baseline. repeats_seed_of: the run id of an
    earlier run of the same code under the same SEED (same_seed_run): this run measured nothing new
    and is not pooled. policy: one of POLICIES (default: VERDICT_MODE's); the keep, rerun and
    discard of a finished run are sequential_verdict's. shared_seeds: how many SEEDs the
    candidate's runs share with the best's (pairing.shared_seeds), rho: the store's shrunk share of
    the noise those runs have in common (pairing.store_share; None: no estimate): the standard
    error of the difference counts their covariance (paired_se)."""
    unjudged = _unjudged(failed, error, repeats_seed_of)
    if unjudged is not None:
        return unjudged
    candidate = np.asarray(candidate, float)
    out = {"n_candidate": len(candidate), "candidate_mean": float(candidate.mean())}
    if (best is None or len(best) == 0) and new_pool:
        return {**out, "verdict": "discard",
                "reason": f"NEW POOL: not comparable with the kept runs ({'; '.join(new_pool)}), "
                          f"so not kept; if that change is meant, start a new baseline: "
                          f"`uv run analyze.py keep --new-baseline`"}
    if best is None or len(best) == 0:
        return {**out, "verdict": "keep", "reason": "no best yet: this run becomes the baseline"}
    if same_as_best:
        return {**out, "verdict": "keep",
                "reason": f"same train.py as the best: a repeat, pooled into it ({len(candidate)} "
                          f"runs)"}
    best = np.asarray(best, float)
    best_mean = float(best.mean())
    sigma, df, sigma_source = _verdict_sigma(noise or noise_estimate([]), best_mean)
    delta = out["candidate_mean"] - best_mean
    se = paired_se(sigma, len(candidate), len(best), shared_seeds, rho)
    z = delta / se if se > 0 else (-math.inf if delta < 0 else math.inf if delta > 0 else 0.0)
    p_noise, p_welch = _p_values(z, df, candidate, best)
    policy = POLICIES[VERDICT_MODE] if policy is None else policy
    out.update(n_best=len(best), best_mean=best_mean, delta=delta, sigma=sigma,
               sigma_source=sigma_source, delta_sigma=delta / sigma if sigma > 0 else None, se=se,
               shared_seeds=shared_seeds, rho=rho if shared_seeds else None,
               z=z, p_value=p_noise, p_welch=p_welch, keep_alpha=policy["keep_alpha"],
               policy=dict(policy, futility=list(policy["futility"])))
    pairs = (shared_seeds, rho)
    return {**out, **_sequential_decision(len(candidate), delta, se, df, p_noise, p_welch, policy,
                                          pairs)}


def paired_se(sigma: float, n_candidate: int, n_best: int, shared: int = 0, rho: float = None):
    """The standard error of mean(candidate) - mean(best) when `shared` of the candidate's runs
    have a run of the best under the same SEED and runs under one seed share `rho` of their noise:
    sigma * sqrt(1/n_c + 1/n_b - 2 rho shared / (n_c n_b)) (the covariance of the two means is
    rho sigma^2 shared / (n_c n_b)). Without pairs or rho, the independent runs' error."""
    paired = 2 * rho * shared / (n_candidate * n_best) if rho and shared else 0.0
    return sigma * math.sqrt(1 / n_candidate + 1 / n_best - paired)


def _unjudged(failed: str, error: str, repeats_seed_of: str):
    """The verdict on a run whose val_bpb is not judged: a failed, invalid or killed run, or a
    repeat under a SEED its code already ran with; None for a finished run to judge."""
    if failed == "invalid":
        return {"verdict": "discard",
                "reason": "INVALID: the evaluation harness, the prepared data or the training "
                          "clock does not check out, so this val_bpb is never kept, pooled or "
                          "counted as the best"}
    if failed == "crash" and error and KILLED_MARK in error:
        return {"verdict": "crash",
                "reason": "KILLED from outside (a tool or supervisor timeout, or a stop), not by "
                          "an error in train.py: the idea is untested; give the run enough time "
                          "(program.md) and run it again"}
    if failed:
        return {"verdict": "crash",
                "reason": f"the run ended with status {failed}: there is no val_bpb to judge"}
    if repeats_seed_of:
        return {"verdict": "rerun",
                "reason": f"the same train.py already ran under this SEED (run {repeats_seed_of}): "
                          f"a repeat measures noise only under another seed, so this run is not "
                          f"pooled; run it again with a new SEED"}
    return None


def _verdict_sigma(noise: dict, best_mean: float) -> tuple:
    """(σ, df, where σ comes from) of one run: the pooled estimate once trusted (df its degrees
    of freedom), else FALLBACK_NOISE_FRACTION of the best (df None); never below the floor."""
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
    return sigma, df, sigma_source


def _p_values(z: float, df, candidate, best) -> tuple:
    """(p, Welch p), both one-sided for H1 candidate < best: p of the difference's z against the
    noise (Student's t on df, the normal without); Welch's test on the runs themselves, None
    without repeats on both sides or where it is undefined (identical values)."""
    from scipy import stats  # here, not at the top: see analysis/stats.py
    p_noise = float(stats.t.cdf(z, df) if df else stats.norm.cdf(z))
    p_welch = None
    if len(candidate) >= 2 and len(best) >= 2:
        with warnings.catch_warnings():  # identical values: scipy warns and returns NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            p = stats.ttest_ind(candidate, best, equal_var=False, alternative="less").pvalue
        p_welch = float(p) if np.isfinite(p) else None
    return p_noise, p_welch


def _sequential_decision(n: int, delta: float, se: float, df, p_noise: float, p_welch,
                         policy: dict, pairs: tuple = (0, None)) -> dict:
    """{verdict, reason} (and confirm: True for an unconfirmed gain; paired_keep: True for a keep
    on the paired threshold) of a finished candidate with `n` runs: sequential_verdict's keep,
    rerun or discard, with the reason in words. pairs: (shared seeds, the store's rho)."""
    p_text = f"p = {p_noise:.3g}" + (f", Welch p = {p_welch:.3g}" if p_welch is not None else "")
    code = int(sequential_verdict(n, delta, se, df or 0, policy, *pairs))
    if delta >= 0:
        return {"verdict": "discard", "reason": f"not better than the best ({p_text})"}
    unpaired = int(sequential_verdict(n, delta, se, df or 0, dict(policy, paired_alpha=None)))
    if code == KEEP_CODE and unpaired != KEEP_CODE:
        return {"verdict": "keep", "paired_keep": True,
                "reason": f"better than the best beyond the noise on the PAIRED THRESHOLD over "
                          f"{n} run(s) under the best's SEEDs ({p_text} < "
                          f"{policy['paired_alpha']}, the store's rho = {pairs[1]:.2f} >= "
                          f"{policy['paired_rho']}): kept without the {policy['confirm_runs']}-run "
                          f"confirmation"}
    if code == KEEP_CODE:
        return {"verdict": "keep",
                "reason": f"better than the best beyond the noise over {n} run(s) ({p_text} < "
                          f"{policy['keep_alpha']})"}
    if code == RERUN_CODE and p_noise < policy["keep_alpha"]:
        return {"verdict": "rerun", "confirm": True,
                "reason": f"better than the best beyond the noise on {n} run(s) ({p_text}), not "
                          f"yet confirmed: a keep needs {policy['confirm_runs']} runs unless "
                          f"p < {policy['strong_alpha']}; run it again with another SEED"}
    if code == RERUN_CODE:
        return {"verdict": "rerun",
                "reason": f"better than the best but within the noise ({p_text}); promising enough "
                          f"to run it again with another SEED"}
    if n >= policy["max_runs"]:
        return {"verdict": "discard",
                "reason": f"better than the best but still within the noise after {n} runs "
                          f"({p_text})"}
    bound = (tuple(policy["futility"]) + (0.0,))[min(n, len(policy["futility"])) - 1]
    return {"verdict": "discard",
            "reason": f"better than the best but within the noise ({p_text} >= {bound} after {n} "
                      f"run(s)): too small to resolve at the price of more runs"}
