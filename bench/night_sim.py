"""
Simulated nights of the overnight loop: what a keep rule buys by morning (a benchmark of analysis/verdict.py).

A night is a fixed number of 5-minute runs (baseline included). Ideas arrive one at a time; each has a true
effect δ on val_bpb drawn from a prior (no-op, harmful, helpful). A run measures the true value of the code
plus N(0, σ²). The rule decides after every run: keep (δ adds to the best), discard, rerun the candidate with
another seed. All nights of a cell advance together, one run per step, so the rules are evaluated on arrays:

- `project` is `analysis.verdict.sequential_verdict` under policy validated (the default before the
  paired threshold) on the unpaired standard error, `project-paired` the same on the paired one, and
  `policy-<name>` each policy of `verdict.POLICIES` as `decide()` applies it in a store (paired
  error, seeds shared with the best, the night's shrunk ρ̂): `policy-paired` is the default;
- `today` is a vectorised copy of the rule before issue 11 and `autoresearch` keeps what is lower on one run.
  `--check K` replays K nights of every rule through the scalar `decide()` (today's from git commit
  `TODAY_COMMIT`, the project's from the working tree; the paired rules at ρ = CHECK_RHO with each
  decision's shared seeds and ρ̂) and fails unless every decision is identical.
- `--confirm K` spends the night's last 2K runs on the end-of-night confirmation: K runs of the
  final best and K of the starting baseline under fresh seeds, reduced by
  `analysis.confirmation.confirmed_gain`.

Common random numbers: every rule sees the same ideas and the same noise draws (the k-th run of idea i, the
j-th run of the baseline), so differences between rules are not differences of luck.

Seed noise (`--rho`, `--seeds`): a run's noise is σ(√ρ·s + √(1-ρ)·e), where s belongs to the run's SEED
(shared by every code run under it in the night: its initialisation and data order) and e to the run alone;
ρ is the share of run noise that comes from the seed (bench/bench_pairing.py measures it). Which seed a run
gets: `paired` (the project's convention, program.md: the k-th run of every code, the baseline's included,
under the k-th seed), `fixed` (every run under one seed, as autoresearch's train.py) or `fresh` (a new seed
per run: independent noise, whatever ρ). ρ = 0 is the model before seed noise, draw for draw.

    uv run bench/night_sim.py                               # the base prior, σ = 0.0003 / 0.0013 / 0.003
    uv run bench/night_sim.py --prior all --json bench/results/night-sim-2026-12-01.json
    uv run bench/night_sim.py --check 40                    # the vectorised rules decide as decide() does
    uv run bench/night_sim.py --sigma 0.0013 --rho 0,0.3,0.6,0.9 --seeds paired,fresh
    uv run bench/night_sim.py --sigma 0.0013 --rho 0,0.88 --rules policy-paired --confirm 2
"""

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis import confirmation, pairing, verdict  # noqa: E402

TODAY_COMMIT = "fd265c0"   # the last commit before issue 11: its analysis/verdict.py is "today's rule"
BASE_VALUE = 1.0           # true val_bpb of the baseline code (the noise floor is a fraction of it)
MAX_RUNS_PER_IDEA = 16     # pre-drawn noise per idea: no rule reruns a candidate more often
MBPB = 1000.0              # reported in milli-bpb (0.001 val_bpb)
MAX_CONFIRM = 8            # confirmation pairs pre-drawn per night: the most --confirm takes

# The priors of the benchmark: fractions of helpful and harmful ideas (the rest are no-ops), the mean of a
# helpful effect (δ = -Exp(mean)), the range of a harmful one (U(lo, hi)) and the range of a no-op's
# effect (0 for a true no-op; slightly positive where "no-op" ideas cost a little).
PRIORS = {
    "base": dict(helpful=0.15, harmful=0.25, helpful_mean=0.002, harmful_lo=0.001, harmful_hi=0.02, noop_hi=0.0),
    "scarce": dict(helpful=0.05, harmful=0.25, helpful_mean=0.002, harmful_lo=0.001, harmful_hi=0.02, noop_hi=0.0),
    "rich": dict(helpful=0.30, harmful=0.25, helpful_mean=0.002, harmful_lo=0.001, harmful_hi=0.02, noop_hi=0.0),
    "small": dict(helpful=0.15, harmful=0.25, helpful_mean=0.0013, harmful_lo=0.0003, harmful_hi=0.003, noop_hi=0.0),
    "noop-hurts": dict(helpful=0.15, harmful=0.25, helpful_mean=0.002, harmful_lo=0.001, harmful_hi=0.02,
                       noop_hi=0.0006),
}
BASELINE_RUNS = {"autoresearch": 1}  # autoresearch runs its baseline once; the project's rules: --baseline-runs

SEED_CONVENTIONS = ("paired", "fixed", "fresh")  # which seed a run gets (see the docstring)

KEEP, DISCARD, RERUN = verdict.KEEP_CODE, verdict.DISCARD_CODE, verdict.RERUN_CODE  # every rule answers in these


# ---------------------------------------------------------------------------
# The streams: ideas and noise, shared by every rule
# ---------------------------------------------------------------------------

def draw_streams(prior: dict, nights: int, runs: int, seed: int) -> dict:
    """Every random number of `nights` nights: the ideas' effects and standard-normal noise per run."""
    rng = np.random.default_rng(seed)
    u = rng.random((nights, runs))
    helpful = u < prior["helpful"]
    harmful = (u >= prior["helpful"]) & (u < prior["helpful"] + prior["harmful"])
    delta = np.where(helpful, -rng.exponential(prior["helpful_mean"], (nights, runs)),
                     np.where(harmful, rng.uniform(prior["harmful_lo"], prior["harmful_hi"], (nights, runs)),
                              rng.uniform(0.0, prior["noop_hi"], (nights, runs)) if prior["noop_hi"] else 0.0))
    streams = {"delta": delta, "eps_idea": rng.standard_normal((nights, runs, MAX_RUNS_PER_IDEA)),
               "eps_best": rng.standard_normal((nights, runs))}
    # drawn last, so that ρ = 0 reproduces the nights drawn before seed noise was modelled
    streams["seed"] = rng.standard_normal((nights, MAX_RUNS_PER_IDEA))  # s of the k-th seed
    # the end-of-night confirmation's (--confirm), drawn after everything else for the same reason:
    # the fresh seeds' s, then each confirmation run's own e (the best's row 0, the baseline's 1)
    streams["confirm_seed"] = rng.standard_normal((nights, MAX_CONFIRM))
    streams["confirm_eps"] = rng.standard_normal((nights, 2, MAX_CONFIRM))
    return streams


def run_noise(eps: np.ndarray, streams: dict, k, rho: float, seeds: str) -> np.ndarray:
    """Standard-normal noise of runs whose own draw is `eps`, run as the k-th of their code (an int,
    or one per night): the seed's share √ρ·s plus the run's own √(1-ρ)·e."""
    if seeds == "fresh" or rho == 0:
        return eps
    rows = np.arange(streams["seed"].shape[0])
    s = streams["seed"][rows, 0 if seeds == "fixed" else k]
    return math.sqrt(rho) * s + math.sqrt(1 - rho) * eps


# ---------------------------------------------------------------------------
# The rules, on arrays of nights
# ---------------------------------------------------------------------------

def _sigma(s: dict):
    """(σ used, df or 0 for the fallback) as decide() computes them, per night."""
    df = s["noise_df"]
    sigma_hat = np.sqrt(s["noise_ss"] / np.maximum(df, 1))
    trusted = df >= verdict.MIN_NOISE_DF
    sigma = np.where(trusted, sigma_hat, verdict.FALLBACK_NOISE_FRACTION * s["best_mean"])
    return np.maximum(sigma, verdict.NOISE_FLOOR_FRACTION * s["best_mean"]), np.where(trusted, df, 0)


def rule_autoresearch(s: dict) -> np.ndarray:
    """autoresearch's program: keep the change when its one run is lower than the best's run."""
    return np.where(s["cand_mean"] < s["best_mean"], KEEP, DISCARD)


def rule_today(s: dict) -> np.ndarray:
    """The verdict before issue 11 (commit TODAY_COMMIT): p < 0.01 on the pooled σ and, with repeats on both
    sides, a one-sided Welch p < 0.05; rerun while better and within the noise, up to 4 runs."""
    sigma, df = _sigma(s)
    n_c, n_b = s["cand_n"], s["best_n"]
    delta = s["cand_mean"] - s["best_mean"]
    z = delta / (sigma * np.sqrt(1 / n_c + 1 / n_b))
    p = np.where(df > 0, stats.t.cdf(z, np.maximum(df, 1)), stats.norm.cdf(z))
    both = (n_c >= 2) & (n_b >= 2)
    vc = s["cand_m2"] / np.maximum(n_c - 1, 1) / n_c
    vb = s["best_m2"] / np.maximum(n_b - 1, 1) / n_b
    with np.errstate(divide="ignore", invalid="ignore"):  # one run on a side: no Welch test, masked below
        df_w = (vc + vb) ** 2 / (vc ** 2 / np.maximum(n_c - 1, 1) + vb ** 2 / np.maximum(n_b - 1, 1))
        p_w = stats.t.cdf(delta / np.sqrt(vc + vb), df_w)
    welch_ok = ~both | (p_w < 0.05)
    keep = (delta < 0) & (p < 0.01) & welch_ok
    rerun = (delta < 0) & ~keep & (n_c < 4)
    return np.where(keep, KEEP, np.where(rerun, RERUN, DISCARD))


def rule_project(policy: dict = None):
    """The project's rule: analysis.verdict.sequential_verdict, the function decide() calls."""
    def rule(s: dict) -> np.ndarray:
        sigma, df = _sigma(s)
        return verdict.sequential_verdict(s["cand_n"], s["cand_mean"] - s["best_mean"],
                                          sigma * np.sqrt(1 / s["cand_n"] + 1 / s["best_n"]), df, policy)
    return rule


def rule_project_paired(policy: dict = None):
    """The project's rule with the paired standard error decide() uses (verdict.paired_se): the
    seeds the candidate shares with the best and the night's own shrunk estimate of ρ
    (pairing.store_share's, from the paired differences of the ideas tried so far); a policy with
    a paired threshold (paired_alpha) also keeps on it where verdict.paired_eligible allows."""
    def rule(s: dict) -> np.ndarray:
        sigma, df = _sigma(s)
        n_c, n_b = s["cand_n"], s["best_n"]
        se = sigma * np.sqrt(1 / n_c + 1 / n_b - 2 * s["rho"] * s["shared"] / (n_c * n_b))
        return verdict.sequential_verdict(n_c, s["cand_mean"] - s["best_mean"], se, df, policy,
                                          shared=s["shared"], rho=s["rho"])
    return rule


def store_rho(pair_ss, pair_df, noise_ss, noise_df) -> np.ndarray:
    """pairing.store_share's ρ per night: 1 - Var(paired difference) / (2σ̂²), at least 0, shrunk
    by df / (df + SHRINK_DF); 0 without paired df or a σ̂."""
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = 1 - (pair_ss / pair_df) / (2 * noise_ss / noise_df)
    ok = (pair_df > 0) & (noise_df > 0) & (noise_ss > 0)
    return np.where(ok, np.maximum(raw, 0.0) * pair_df / (pair_df + pairing.SHRINK_DF), 0.0)


# `project` and `project-paired` keep the meaning of the tables before the paired threshold: policy
# validated (the default then) on the unpaired and on the paired standard error; `project-validated`
# and `project-gain` those policies on the unpaired one; `policy-<name>` is each policy of
# verdict.POLICIES as decide() applies it in a store (paired error, shared seeds, the store's ρ̂):
# `policy-paired` is today's default.
RULES = {"autoresearch": rule_autoresearch, "today": rule_today,
         "project": rule_project(verdict.POLICIES["validated"]),
         "project-paired": rule_project_paired(verdict.POLICIES["validated"])}
for _mode in ("validated", "gain"):
    RULES[f"project-{_mode}"] = rule_project(verdict.POLICIES[_mode])
for _mode, _policy in verdict.POLICIES.items():
    RULES[f"policy-{_mode}"] = rule_project_paired(_policy)
PAIRED_RULES = {"project-paired": verdict.POLICIES["validated"],
                **{f"policy-{m}": p for m, p in verdict.POLICIES.items()}}  # decide() with pairs


# ---------------------------------------------------------------------------
# One cell: nights of one rule at one σ
# ---------------------------------------------------------------------------

def simulate(rule, streams: dict, sigma: float, runs: int, baseline_runs: int, record: int = 0,
             rho: float = 0.0, seeds: str = "paired", confirm: int = 0) -> dict:
    """Run every night of `streams` under `rule`; per-night outcomes, and the first `record` nights' decisions
    (candidate values, best values, verdict) for --check. rho, seeds: the seed noise (module
    docstring). confirm: K > 0 spends the night's last 2K runs on the confirmation
    (confirm_night)."""
    delta_all, eps_i, eps_b = streams["delta"], streams["eps_idea"], streams["eps_best"]
    nights = delta_all.shape[0]
    rows = np.arange(nights)
    base = BASE_VALUE + sigma * np.stack([run_noise(eps_b[:, j], streams, j, rho, seeds)
                                          for j in range(baseline_runs)], axis=1)
    best_true = np.full(nights, BASE_VALUE)
    best_n = np.full(nights, baseline_runs)
    best_mean = base.mean(axis=1)
    best_m2 = ((base - best_mean[:, None]) ** 2).sum(axis=1)
    noise_ss, noise_df = best_m2.copy(), np.full(nights, baseline_runs - 1)
    idea = np.zeros(nights, int)
    cand_n = np.zeros(nights, int)
    cand_mean, cand_m2 = np.zeros(nights), np.zeros(nights)
    # for the paired rule: the best's runs by seed, the candidate's, and the store's ρ (its paired
    # differences' squares about each idea's mean, and their df, over the ideas decided so far;
    # each against the best of its time, where the store pairs every idea with today's best)
    best_vals = np.full((nights, MAX_RUNS_PER_IDEA), np.nan)
    best_vals[:, :baseline_runs] = base
    cand_vals = np.full((nights, MAX_RUNS_PER_IDEA), np.nan)
    pair_ss, pair_df = np.zeros(nights), np.zeros(nights)
    out = {k: np.zeros(nights) for k in ("keeps", "false_keeps", "harmful_keeps", "helpful_missed", "decided")}
    log = [[] for _ in range(min(record, nights))]
    hist = [{"best": list(base[i]), "cand": []} for i in range(min(record, nights))]
    for _ in range(runs - baseline_runs - 2 * confirm):
        delta = delta_all[rows, idea]
        x = best_true + delta + sigma * run_noise(eps_i[rows, idea, cand_n], streams, cand_n, rho, seeds)
        dx = x - cand_mean
        noise_ss += np.where(cand_n > 0, cand_n / (cand_n + 1) * dx ** 2, 0.0)
        noise_df += cand_n > 0
        cand_n = cand_n + 1
        cand_mean = cand_mean + dx / cand_n
        cand_m2 = cand_m2 + dx * (x - cand_mean)
        cand_vals[rows, cand_n - 1] = x
        diffs = cand_vals - best_vals if seeds == "paired" else np.full_like(cand_vals, np.nan)
        shared = np.isfinite(diffs).sum(axis=1)
        with np.errstate(invalid="ignore"):
            own_ss = np.nansum((diffs - np.nanmean(np.where(shared[:, None] > 0, diffs, 0.0), axis=1,
                                                   keepdims=True)) ** 2, axis=1)
        own_df = np.maximum(shared - 1, 0)
        rho_now = store_rho(pair_ss + own_ss, pair_df + own_df, noise_ss, noise_df)
        action = rule({"cand_n": cand_n, "cand_mean": cand_mean, "cand_m2": cand_m2, "best_n": best_n,
                       "best_mean": best_mean, "best_m2": best_m2, "noise_ss": noise_ss, "noise_df": noise_df,
                       "shared": shared, "rho": rho_now})
        for i in range(len(log)):
            hist[i]["cand"].append(float(x[i]))
            log[i].append({"candidate": list(hist[i]["cand"]), "best": list(hist[i]["best"]),
                           "shared": int(shared[i]), "rho": float(rho_now[i]),
                           "action": int(action[i])})
            if action[i] != RERUN:
                if action[i] == KEEP:
                    hist[i]["best"] = list(hist[i]["cand"])
                hist[i]["cand"] = []
        keep, done = action == KEEP, action != RERUN
        out["keeps"] += keep
        out["false_keeps"] += keep & (delta >= 0)
        out["harmful_keeps"] += keep & (delta > 0)
        out["helpful_missed"] += (action == DISCARD) & (delta < 0)
        out["decided"] += done
        best_true = np.where(keep, best_true + delta, best_true)
        best_n = np.where(keep, cand_n, best_n)
        best_mean = np.where(keep, cand_mean, best_mean)
        best_m2 = np.where(keep, cand_m2, best_m2)
        pair_ss = np.where(done, pair_ss + own_ss, pair_ss)
        pair_df = np.where(done, pair_df + own_df, pair_df)
        best_vals = np.where(keep[:, None], cand_vals, best_vals)
        cand_vals = np.where(done[:, None], np.nan, cand_vals)
        idea = idea + done
        cand_n = np.where(done, 0, cand_n)
        cand_mean = np.where(done, 0.0, cand_mean)
        cand_m2 = np.where(done, 0.0, cand_m2)
    out["gain"] = (BASE_VALUE - best_true) * MBPB
    out["optimism"] = (best_true - best_mean) * MBPB
    out["log"] = log
    if confirm:
        sigma_hat, df = _sigma({"noise_ss": noise_ss, "noise_df": noise_df, "best_mean": best_mean})
        rho_hat = store_rho(pair_ss, pair_df, noise_ss, noise_df)
        out.update(confirm_night(streams, best_true, sigma, rho, confirm, sigma_hat, df, rho_hat))
    return out


def confirm_night(streams: dict, best_true, sigma: float, rho: float, k: int, sigma_hat, df,
                  rho_hat) -> dict:
    """The end-of-night confirmation: K runs of the final best and K of the starting baseline,
    pair j under a fresh seed (its own s, shared by the pair, never used in the night), reduced by
    the product's confirmation.confirmed_gain. Per night: the reported gain and whether the truth
    lies in the interval the report prints, on the pairs' own spread (t on K - 1 df) and on the night's
    pooled σ̂ and shrunk ρ̂ (sigma_hat on df, rho_hat); and whether the best's lead survived."""
    if not 1 <= k <= MAX_CONFIRM:
        raise ValueError(f"--confirm takes 1 to {MAX_CONFIRM} pairs")
    s = streams["confirm_seed"][:, :k]
    own = math.sqrt(rho) * s
    eps = math.sqrt(1 - rho) * streams["confirm_eps"][:, :, :k]
    best = best_true[:, None] + sigma * (own + eps[:, 0])
    base = BASE_VALUE + sigma * (own + eps[:, 1])
    truth = BASE_VALUE - best_true
    spread = confirmation.confirmed_gain(best, base)
    pooled = confirmation.confirmed_gain(best, base, sigma=sigma_hat, df=df, rho=rho_hat)
    with np.errstate(invalid="ignore"):  # K = 1: no spread, no interval (never covers)
        covered = (spread["low"] <= truth) & (truth <= spread["high"])
    return {"confirmed_gain": pooled["estimate"] * MBPB,
            "confirmed_optimism": (pooled["estimate"] - truth) * MBPB,
            "covered_spread": covered, "width_spread": (spread["high"] - spread["low"]) * MBPB,
            "covered_pooled": (pooled["low"] <= truth) & (truth <= pooled["high"]),
            "width_pooled": (pooled["high"] - pooled["low"]) * MBPB,
            "survived": pooled["survived"]}


def summarize(out: dict, runs: int, baseline_runs: int) -> dict:
    n = len(out["gain"])
    gain = out["gain"]
    keeps = out["keeps"].sum()
    return {"true_gain_mbpb": float(gain.mean()), "gain_ci95": float(1.96 * gain.std(ddof=1) / math.sqrt(n)),
            "false_keeps": float(out["false_keeps"].mean()), "harmful_keeps": float(out["harmful_keeps"].mean()),
            "helpful_missed": float(out["helpful_missed"].mean()), "decided": float(out["decided"].mean()),
            "runs_per_keep": float((runs - baseline_runs) * n / keeps) if keeps else None,
            "optimism_mbpb": float(out["optimism"].mean()), "keeps": float(out["keeps"].mean()),
            **(summarize_confirmation(out) if "confirmed_gain" in out else {})}


def summarize_confirmation(out: dict) -> dict:
    """The confirmation's numbers of a cell: its optimism (reported - true gain, mbpb, with its
    Monte Carlo 95 % half-width), each interval's coverage of the true gain and mean width, and the
    share of nights whose lead survived."""
    opt = out["confirmed_optimism"]
    return {"confirmed_gain_mbpb": float(out["confirmed_gain"].mean()),
            "confirmed_optimism_mbpb": float(opt.mean()),
            "confirmed_optimism_ci95": float(1.96 * opt.std(ddof=1) / math.sqrt(len(opt))),
            "coverage_spread": float(out["covered_spread"].mean()),
            "width_spread_mbpb": float(np.nanmean(out["width_spread"]))
            if np.isfinite(out["width_spread"]).any() else None,
            "coverage_pooled": float(out["covered_pooled"].mean()),
            "width_pooled_mbpb": float(out["width_pooled"].mean()),
            "survived": float(out["survived"].mean())}


# ---------------------------------------------------------------------------
# --check: the vectorised rules decide exactly as decide() does
# ---------------------------------------------------------------------------

def _module_at(commit: str, path: str, name: str):
    """`path` as it was at `commit` (git show), imported as module `name`."""
    source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    exec(compile(source, f"{commit}:{path}", "exec"), module.__dict__)
    return module


def today_module():
    """analysis/verdict.py as it was at TODAY_COMMIT, with the schema.py of that commit (which
    the reshape moved into harness/contract.py), imported under other names."""
    schema = _module_at(TODAY_COMMIT, "schema.py", "schema_today")
    with mock.patch.dict(sys.modules, {"schema": schema}):  # what the old `import schema` finds
        return _module_at(TODAY_COMMIT, "analysis/verdict.py", "verdict_today")


def scalar_decision(module, candidate: list, best: list, groups: list, policy=None,
                    pairs: tuple = None) -> int:
    """The verdict of the real decide() (of `module`) on one decision, as an action code. pairs:
    (shared seeds, the store's ρ̂) for a rule on the paired standard error, passed to decide()."""
    noise = module.noise_estimate(groups)
    kwargs = {"policy": policy} if policy is not None else {}
    if pairs is not None:
        kwargs.update(shared_seeds=pairs[0], rho=pairs[1])
    decision = module.decide(candidate, best, noise, **kwargs)
    code = {"keep": KEEP, "discard": DISCARD, "rerun": RERUN}[decision["verdict"]]
    return code if pairs is None else (code, bool(decision.get("paired_keep")))


# the seed noise under which --check replays the rules on paired standard errors: the measured
# CPU share, where the store's ρ̂ passes policy paired's bound and its threshold decides
CHECK_RHO = 0.88


def check(nights: int, sigmas: list, runs: int, baseline_runs: int, seed: int) -> list:
    """Replay `nights` nights per rule and σ through the scalar decide(); return the mismatches
    (none expected), the decisions checked and how many of them decide() kept on the paired
    threshold. The rules on the paired standard error (PAIRED_RULES) are replayed on paired seeds at
    ρ = CHECK_RHO, with each decision's shared seeds and the night's ρ̂ passed to decide()."""
    today = today_module()
    real = {"today": (today, None), "project": (verdict, verdict.POLICIES["validated"])}
    real.update({f"project-{m}": (verdict, verdict.POLICIES[m]) for m in ("validated", "gain")})
    real.update({name: (verdict, p) for name, p in PAIRED_RULES.items()})
    mismatches, checked, paired_keeps = [], 0, 0
    for sigma in sigmas:
        streams = draw_streams(PRIORS["base"], nights, runs, seed)
        for name, (module, policy) in real.items():
            paired = name in PAIRED_RULES
            out = simulate(RULES[name], streams, sigma, runs, baseline_runs, record=nights,
                           rho=CHECK_RHO if paired else 0.0)
            for night, decisions in enumerate(out["log"]):
                groups_done = []
                for d in decisions:
                    groups = groups_done + [d["best"]] + ([d["candidate"]] if len(d["candidate"]) > 1 else [])
                    got = scalar_decision(module, d["candidate"], d["best"], groups, policy,
                                          (d["shared"], d["rho"]) if paired else None)
                    if paired:
                        got, on_threshold = got
                        paired_keeps += on_threshold
                    checked += 1
                    if got != d["action"]:
                        mismatches.append({"rule": name, "sigma": sigma, "night": night, **d, "decide": got})
                    if d["action"] != RERUN:
                        if len(d["candidate"]) > 1 and d["action"] != KEEP:
                            groups_done.append(d["candidate"])
                        if d["action"] == KEEP:
                            groups_done.append(d["best"])
    return mismatches, checked, paired_keeps


# ---------------------------------------------------------------------------
# --pareto: the policies tried, gain against false keeps
# ---------------------------------------------------------------------------

PARETO_GRID = dict(keep_alpha=(0.02, 0.05, 0.1, 0.2, 0.3), strong_alpha=(0.001, 0.01, 0.05), confirm_runs=(1, 2, 3, 4),
                   futility=((0.2, 0.1, 0.05), (0.3, 0.15, 0.1, 0.05), (0.5, 0.3, 0.3)))


def pareto(sigmas: list, nights: int, runs: int, baseline_runs: int, seed: int) -> list:
    """Every policy of PARETO_GRID on the base prior: gain per σ and the worst false keeps over σ; each row
    says whether another policy has at least its gain at every σ with no more false keeps (dominated)."""
    import itertools
    streams = draw_streams(PRIORS["base"], nights, runs, seed)
    rows = []
    for ka, sa, cr, fut in itertools.product(*PARETO_GRID.values()):
        if sa > ka:
            continue
        policy = dict(keep_alpha=ka, strong_alpha=sa, confirm_runs=cr, futility=fut, max_runs=max(cr, 4))
        cells = [summarize(simulate(rule_project(policy), streams, s, runs, baseline_runs), runs, baseline_runs)
                 for s in sigmas]
        rows.append({"policy": dict(policy, futility=list(fut)), "gain": [c["true_gain_mbpb"] for c in cells],
                     "false_keeps": max(c["false_keeps"] for c in cells),
                     "optimism": [c["optimism_mbpb"] for c in cells]})
    for r in rows:
        r["dominated"] = any(o is not r and o["false_keeps"] <= r["false_keeps"]
                             and all(a >= b for a, b in zip(o["gain"], r["gain"])) and o["gain"] != r["gain"]
                             for o in rows)
    return rows


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def run_cells(priors: list, sigmas: list, rules: list, nights: int, runs: int, baseline_runs: int, seed: int,
              rhos=(0.0,), conventions=("paired",), confirm: int = 0) -> list:
    results = []
    for p_index, prior_name in enumerate(priors):
        streams = draw_streams(PRIORS[prior_name], nights, runs, seed + p_index)
        for sigma in sigmas:
            for rho in rhos:
                for seeds in conventions:
                    for name in rules:
                        b = BASELINE_RUNS.get(name, baseline_runs)
                        out = simulate(RULES[name], streams, sigma, runs, b, rho=rho, seeds=seeds,
                                       confirm=confirm)
                        results.append({"prior": prior_name, "sigma": sigma, "rho": rho, "seeds": seeds,
                                        "rule": name, "baseline_runs": b, **summarize(out, runs, b)})
    return results


def table(results: list) -> str:
    lines = ["| prior | σ | ρ | seeds | rule | true gain (mbpb, ±95 %) | false keeps | harmful keeps | "
             "helpful missed | ideas decided | runs / keep | optimism (mbpb) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rpk = f"{r['runs_per_keep']:.1f}" if r["runs_per_keep"] else "—"
        lines.append(f"| {r['prior']} | {r['sigma']:g} | {r['rho']:g} | {r['seeds']} | {r['rule']} | "
                     f"{r['true_gain_mbpb']:.1f} ± {r['gain_ci95']:.1f} "
                     f"| {r['false_keeps']:.2f} | {r['harmful_keeps']:.2f} | {r['helpful_missed']:.1f} | "
                     f"{r['decided']:.1f} | {rpk} | {r['optimism_mbpb']:+.2f} |")
    return "\n".join(lines + (confirmation_table(results) if "survived" in results[0] else []))


def confirmation_table(results: list) -> list:
    """The --confirm columns: the confirmed gain, its optimism, each interval's coverage and
    width."""
    lines = ["", "| prior | σ | ρ | seeds | rule | confirmed gain (mbpb) | "
             "its optimism (mbpb, ±95 %) | coverage, pooled σ̂ (width) | "
             "coverage, pairs' t (width) | lead survived |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        spread = (f"{r['coverage_spread']:.3f} ({r['width_spread_mbpb']:.1f})"
                  if r["width_spread_mbpb"] is not None else "—")
        lines.append(f"| {r['prior']} | {r['sigma']:g} | {r['rho']:g} | {r['seeds']} | "
                     f"{r['rule']} | {r['confirmed_gain_mbpb']:.1f} | "
                     f"{r['confirmed_optimism_mbpb']:+.2f} ± "
                     f"{r['confirmed_optimism_ci95']:.2f} | {r['coverage_pooled']:.3f} "
                     f"({r['width_pooled_mbpb']:.1f}) | {spread} | {r['survived']:.3f} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--prior", default="base", help=f"one of {', '.join(PRIORS)}, or all")
    parser.add_argument("--sigma", default="0.0003,0.0013,0.003", help="seed-to-seed noise σ, comma-separated")
    parser.add_argument("--rules", default="autoresearch,today,project", help=f"of {', '.join(RULES)}")
    parser.add_argument("--nights", type=int, default=4000)
    parser.add_argument("--runs", type=int, default=100, help="5-minute runs per night, the baseline included")
    parser.add_argument("--baseline-runs", type=int, default=3, help="runs of the baseline (program.md: 3)")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--rho", default="0", help="the seed's share of run noise, comma-separated")
    parser.add_argument("--seeds", default="paired",
                        help=f"which seed each run gets, comma-separated: {', '.join(SEED_CONVENTIONS)}")
    parser.add_argument("--confirm", type=int, default=0, metavar="K",
                        help="spend the last 2K runs on the end-of-night confirmation (K pairs)")
    parser.add_argument("--check", type=int, metavar="K", help="replay K nights through decide() and compare")
    parser.add_argument("--pareto", action="store_true", help="sweep PARETO_GRID on the base prior instead")
    parser.add_argument("--json", help="write the results (and the command) here")
    args = parser.parse_args(argv)
    sigmas = [float(s) for s in args.sigma.split(",")]
    rhos = [float(r) for r in args.rho.split(",")]
    conventions = args.seeds.split(",")
    if not all(0 <= r < 1 for r in rhos) or not set(conventions) <= set(SEED_CONVENTIONS):
        parser.error(f"--rho takes shares in [0, 1); --seeds takes {', '.join(SEED_CONVENTIONS)}")
    if args.check:
        mismatches, checked, paired_keeps = check(args.check, sigmas, args.runs, args.baseline_runs,
                                                  args.seed)
        print(f"checked {checked} decisions against decide(): {len(mismatches)} differ "
              f"({paired_keeps} keeps on the paired threshold among them)")
        for m in mismatches[:5]:
            print(json.dumps(m))
        return 1 if mismatches else 0
    if args.pareto:
        rows = pareto(sigmas, args.nights, args.runs, args.baseline_runs, args.seed)
        front = sorted((r for r in rows if not r["dominated"]), key=lambda r: r["false_keeps"])
        print("| false keeps (worst σ) | gain at σ = " + " / ".join(map(str, sigmas)) + " | optimism | policy |")
        print("|---|---|---|---|")
        for r in front:
            print(f"| {r['false_keeps']:.2f} | {' / '.join(f'{g:.1f}' for g in r['gain'])} | "
                  f"{' / '.join(f'{o:+.2f}' for o in r['optimism'])} | {json.dumps(r['policy'])} |")
        if args.json:
            Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1) + "\n")
        return 0
    priors = list(PRIORS) if args.prior == "all" else args.prior.split(",")
    started = time.time()
    results = run_cells(priors, sigmas, args.rules.split(","), args.nights, args.runs, args.baseline_runs, args.seed,
                        rhos, conventions, args.confirm)
    print(table(results))
    print(f"({args.nights} nights per cell, {args.runs} runs per night, seed {args.seed}, "
          f"{time.time() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "nights": args.nights, "runs": args.runs,
                                               "seed": args.seed, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
