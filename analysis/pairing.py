"""
Seed pairing, as pure functions: how much of the run-to-run noise of val_bpb two runs under the same
SEED share (they start from the same initialisation and see the data in the same order).

Call that share rho. Two codes run under the same seed differ by their true difference plus noise of
variance 2 sigma^2 (1 - rho); under independent seeds the noise is 2 sigma^2. Pairing an idea's runs
with the best's same-seed runs is worth building only when rho is large (issue 21).
"""

import numpy as np

# percentile bootstrap over seeds: enough draws that the interval's ends move < 0.01 between runs
BOOTSTRAP_DRAWS = 10_000
INTERVAL_LEVEL = 0.95
# a bootstrap over 2 seeds has one resample with any spread (both seeds), so its "interval" is the
# point itself: an interval needs at least 3
MIN_INTERVAL_SEEDS = 3


def seed_share(first, second) -> float:
    """rho-hat from the val_bpb of two codes under the same seeds (first[j] and second[j] share
    seed j): 1 - Var(second - first) / (Var(first) + Var(second)), variances over seeds (ddof 1).
    1: pairing cancels all the noise; 0: a same-seed difference is as noisy as one of independent
    runs; below 0: the seed's effects run opposite in the two codes."""
    first, second = np.asarray(first, float), np.asarray(second, float)
    if first.shape != second.shape or first.ndim != 1 or len(first) < 2:
        raise ValueError("seed_share needs two equally long series of at least 2 runs each")
    total = first.var(ddof=1) + second.var(ddof=1)
    if total == 0:
        raise ValueError("seed_share of runs without any noise is undefined")
    return float(1 - (second - first).var(ddof=1) / total)


def seed_share_interval(first, second, draws: int = BOOTSTRAP_DRAWS,
                        level: float = INTERVAL_LEVEL, rng_seed: int = 0) -> tuple:
    """(low, high): the percentile bootstrap interval of seed_share, resampling seeds (each draw
    keeps a seed's two runs together). Draws whose runs have no spread are skipped. Raises
    ValueError under MIN_INTERVAL_SEEDS seeds."""
    first, second = np.asarray(first, float), np.asarray(second, float)
    if len(first) < MIN_INTERVAL_SEEDS:
        raise ValueError(f"an interval of rho-hat needs {MIN_INTERVAL_SEEDS} seeds or more, "
                         f"not {len(first)}: run more seeds")
    rng = np.random.default_rng(rng_seed)
    values = []
    for _ in range(draws):
        pick = rng.integers(0, len(first), len(first))
        if first[pick].var() + second[pick].var() > 0:
            values.append(seed_share(first[pick], second[pick]))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def unpaired_share(first, second) -> float:
    """The same statistic for runs that do not share seeds (first[j] against second[j + 1]): what
    seed_share must come to when the seed carries nothing, a check of the measurement."""
    return seed_share(first, np.roll(np.asarray(second, float), -1))


def same_shapes(a: dict, b: dict) -> bool:
    """Whether two runs' models have the same initialisation's shapes, so that one SEED draws the
    same initial weights in both: their parameter counts agree (a change of width, depth or
    vocabulary changes it). Runs that differ are never paired."""
    return a.get("num_params_M") is not None and a.get("num_params_M") == b.get("num_params_M")


def shared_seeds(candidate: list, best: list) -> int:
    """How many SEEDs the candidate's runs share with the best's (ledger records; 0 when their
    shapes differ)."""
    if not candidate or not best or not same_shapes(candidate[0], best[0]):
        return 0
    return len({r.get("seed") for r in candidate} & {r.get("seed") for r in best} - {None})


# A store's pooled rho-hat is shrunk toward 0 by df / (df + SHRINK_DF), df its paired degrees of
# freedom: with 2 (one idea run 3 times on the best's seeds) it counts for a fifth of what it says,
# with 40 for 83 %. Rho is never taken from fewer pairs than the data support.
SHRINK_DF = 8


def store_share(groups: dict, best_key, sigma) -> dict:
    """The store's seed share: each code's runs paired with the best's runs under the same SEED.

    groups: {code key: [ledger records]} (verdict.pools), best_key: the best's code key, sigma: the
    store's noise sigma (None: no estimate yet). The paired differences of each code of the best's
    shapes (same_shapes) with 2 or more shared seeds give Var(difference) about their own mean
    (df: their count less one per code);
    raw = 1 - Var / (2 sigma^2), and the reported rho is max(raw, 0) * df / (df + SHRINK_DF).
    Returns {"rho", "raw", "df", "codes"} (rho and raw None without paired runs or sigma)."""
    best_runs = groups.get(best_key, [])
    best = {r.get("seed"): r["val_bpb"] for r in best_runs}
    squares, df, codes = 0.0, 0, 0
    for key, records in groups.items():
        if key == best_key or not best_runs or not same_shapes(records[0], best_runs[0]):
            continue
        differences = np.asarray([r["val_bpb"] - best[r.get("seed")] for r in records
                                  if r.get("seed") in best], float)
        if len(differences) >= 2:
            squares += float(((differences - differences.mean()) ** 2).sum())
            df += len(differences) - 1
            codes += 1
    if df == 0 or not sigma:
        return {"rho": None, "raw": None, "df": df, "codes": codes}
    raw = 1 - squares / df / (2 * sigma ** 2)
    return {"rho": max(raw, 0.0) * df / (df + SHRINK_DF), "raw": raw, "df": df, "codes": codes}
