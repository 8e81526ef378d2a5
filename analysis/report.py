"""
Text for people and agents: analysis.md of a run, the short stdout summary, `status`, `compare`, and
the "## Current Best" block of insights.md. Rendering only: every number arrives computed.
"""

import time

import numpy as np

from harness import contract
from analysis import confirmation, nights, stats, verdict
from harness.settings import MAIN_WORKER
from analysis.store import NOTES_DIR, STORE_DIR, worker_of

# analysis.md's last section: where it says the agent's notes on the run are (notes/<run_id>.md;
# a store from before notes/ has them below this heading)
NOTES_HEADING = "## Agent Investigation Notes"
NOTES_POINTER = "This file is the harness's: write your notes on this run in"

STDOUT_MAX_LINES = 15         # what the agent reads after every run; the rest is in analysis.md
# a config diff longer than this is cut (the full one is in run_summary.json)
MAX_CONFIG_ROWS = 40
MAX_TABLE_ROWS = 12           # rows of the validation and layer tables
BEST_BEGIN = ("<!-- current-best:begin (maintained by `uv run analyze.py keep`; edits here are "
              "overwritten) -->")
BEST_END = "<!-- current-best:end -->"
NEXT_ACTION = {
    "keep": "uv run analyze.py keep",
    "rerun": "SEED={seed} uv run launch.py && uv run analyze.py",
    "discard": "uv run analyze.py discard",
    "crash": "read the traceback below, fix train.py or discard: uv run analyze.py discard",
    "invalid": "undo what the integrity problems name (git checkout the harness files), "
               "then: uv run analyze.py discard",
}


def next_action(record: dict, decision: dict) -> str:
    action = NEXT_ACTION["invalid" if record.get("status") == "invalid" else decision["verdict"]]
    return action.format(seed=decision.get("next_seed", "<a new seed>"))


def _f(value, digits: int = 6, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _sigma_units(delta, sigma) -> str:
    return f" ({delta / sigma:+.1f}σ)" if delta is not None and sigma else ""


def _noise_sigma(noise: dict):
    return noise["sigma"] if noise.get("trusted") else None


def _pooled_mean(records) -> float:
    return float(np.mean([r["val_bpb"] for r in records]))


def result_lines(ctx: dict) -> list:
    """val_bpb and its deltas, as markdown bullets (also the core of the stdout summary)."""
    record, decision, noise = ctx["record"], ctx["decision"], ctx["noise"]
    value = record.get("val_bpb")
    sigma = decision.get("sigma") or _noise_sigma(noise)
    lines = []
    if value is None:
        lines.append(f"val_bpb: **none** — the run ended with status `{record['status']}`"
                     + (f": {record['error']}" if record.get("error") else ""))
    elif record["status"] == "invalid":
        lines.append(f"val_bpb: **{value:.6f}** — INVALID, never counted: the run broke metric "
                     f"integrity")
    else:
        lines.append(f"val_bpb: **{value:.6f}**")
    best_records = ctx["best_records"]
    if best_records and value is not None:
        mean = _pooled_mean(best_records)
        delta = value - mean
        lines.append(f"vs best {ctx['best']['run_id']} (pooled mean {mean:.6f} over "
                     f"{len(best_records)} run(s)): {delta:+.6f}{_sigma_units(delta, sigma)}")
        twin = next((r for r in best_records if r.get("seed") == record.get("seed")
                     and r.get("run_id") != record.get("run_id")), None)
        if twin is not None:  # same initialisation and data order: the seed's noise cancels
            paired = value - twin["val_bpb"]
            lines.append(f"vs the best's run under the same SEED {record.get('seed')} "
                         f"({twin['run_id']}, {twin['val_bpb']:.6f}): {paired:+.6f}")
        if decision.get("n_candidate", 1) > 1 and "delta" in decision:
            lines.append(f"this code pooled over {decision['n_candidate']} runs: "
                         f"{decision['candidate_mean']:.6f}, {decision['delta']:+.6f}"
                         f"{_sigma_units(decision['delta'], sigma)} vs the best")
    elif value is not None:
        lines.append("vs best: no best yet")
    previous = ctx["previous"]
    if previous:
        prev_value = previous.get("val_bpb")
        # never a delta against a number that does not count
        if verdict.finished(previous) and value is not None:
            lines.append(f"vs previous {previous['run_id']} ({prev_value:.6f}): "
                         f"{value - prev_value:+.6f}{_sigma_units(value - prev_value, sigma)}")
        else:
            lines.append(f"vs previous {previous['run_id']}: n/a (status {previous['status']})")
    if sigma:
        source = decision.get("sigma_source") or f"pooled from repeats ({noise['df']} df)"
        lines.append(f"noise σ (one run, seed to seed): {sigma:.6f} — {source}")
    else:
        lines.append(f"noise σ: no estimate yet ({noise['df']} df < {verdict.MIN_NOISE_DF}): "
                     f"run the same commit with other SEEDs")
    return lines


def stdout_lines(ctx: dict, analysis_path) -> list:
    record, decision = ctx["record"], ctx["decision"]
    lines = [f"run {record['run_id']} (commit {record['commit']}, seed {record.get('seed')}): "
             f"status {record['status']}"]
    problems = record.get("integrity") or []
    if problems:
        more = f" (and {len(problems) - 1} more in analysis.md)" if len(problems) > 1 else ""
        lines.append(f"INVALID: {problems[0]}{more}")
    lines += result_lines(ctx)
    lines.append(f"verdict: {decision['verdict'].upper()} — {decision['reason']}")
    lines.append(f"next: {next_action(record, decision)}")
    lines += [f"note: {n}" for n in record.get("notes", [])][:3]
    lines.append(f"analysis: {analysis_path}")
    # markdown emphasis is for analysis.md
    return [line.replace("**", "") for line in lines[:STDOUT_MAX_LINES]]


# ---------------------------------------------------------------------------
# analysis.md
# ---------------------------------------------------------------------------

def _verdict_section(ctx) -> list:
    d = ctx["decision"]
    out = [f"**{d['verdict'].upper()}** — {d['reason']}.", ""]
    if "delta" in d:
        welch = (f"{d['p_welch']:.3g}" if d.get("p_welch") is not None
                 else "n/a (needs repeats on both sides)")
        policy = d.get("policy") or verdict.POLICIES[verdict.VERDICT_MODE]
        out += [
            "| | value |", "|---|---|",
            f"| candidate mean (runs) | {d['candidate_mean']:.6f} ({d['n_candidate']}) |",
            f"| best mean (runs) | {d['best_mean']:.6f} ({d['n_best']}) |",
            f"| difference | {d['delta']:+.6f} |",
            f"| noise σ per run | {d['sigma']:.6f} ({d['sigma_source']}) |",
            f"| standard error of the difference | {d['se']:.6f} ({_pairing_words(d)}) |",
            f"| one-sided p (difference vs noise) | {d['p_value']:.3g} (keep below "
            f"{policy['keep_alpha']} on {policy['confirm_runs']} runs, or below "
            f"{policy['strong_alpha']} on fewer) |",
            *([f"| keep on the paired threshold | p below {policy['paired_alpha']} on "
               f"{policy['paired_runs']}+ run(s), every one under a SEED of the best's, once the "
               f"store's ρ is at least {policy['paired_rho']} (this keep: "
               f"{'yes' if d.get('paired_keep') else 'no'}) |"]
              if policy.get("paired_alpha") is not None else []),
            f"| rerun while p is below (after 1, 2, … runs) | "
            f"{', '.join(map(str, policy['futility']))} (at most {policy['max_runs']} runs) |",
            f"| one-sided Welch p | {welch} (reported, not a condition) |", ""]
    out.append(f"Next: `{next_action(ctx['record'], d)}`")
    if d["verdict"] == "rerun":
        max_runs = (d.get("policy") or {}).get("max_runs", verdict.MAX_RUNS_PER_CANDIDATE)
        out.append(f"(a candidate within the noise after {max_runs} runs is discarded)")
    return out


def _pairing_words(d: dict) -> str:
    """How the verdict's standard error counted the SEEDs the candidate shares with the best."""
    shared = d.get("shared_seeds") or 0
    if d.get("rho") is not None:
        return (f"paired: {shared} SEED(s) shared with the best, which share ρ = {d['rho']:.2f} "
                f"of the noise")
    if shared:
        return f"unpaired: {shared} SEED(s) shared with the best, but no estimate of ρ yet"
    return "unpaired: no SEED shared with a best of the same shapes"


def _config_section(ctx) -> list:
    diff = ctx["config_diff"]
    if diff is None:
        return ["No best run yet to compare with."]
    if not diff:
        return [f"Identical to the best {ctx['best']['run_id']} over every captured constant."]
    out = [f"| constant | best {ctx['best']['run_id']} | this run |", "|---|---|---|"]
    out += [f"| `{k}` | `{a}` | `{b}` |" for k, a, b in diff[:MAX_CONFIG_ROWS]]
    if len(diff) > MAX_CONFIG_ROWS:
        out.append(f"| … {len(diff) - MAX_CONFIG_ROWS} more | | |")
    return out


def _performance_section(ctx) -> list:
    r, t = ctx["record"], ctx["trajectory"]
    st = t["step_time"]
    vram = r.get("peak_vram_mb")
    out = [f"- MFU: {_f(r.get('mfu_percent'), 1)} % (0 where the device's peak FLOPs are unknown)",
           f"- tokens: {_f(r.get('total_tokens_M'), 1)} M in {r.get('num_steps')} steps; "
           f"median {_f(t['tokens_per_sec'], 0)} tokens/s",
           f"- peak VRAM: {_f(vram / 1024 if vram is not None else None, 2)} GB",
           f"- time: {_f(r.get('training_seconds'), 1)} s training, "
           f"{_f(r.get('startup_seconds'), 1)} s startup, "
           f"{_f(r.get('total_seconds'), 1)} s total (budget {r.get('time_budget_s')} s)"]
    compiled = r.get("compile")
    # train.py's fast path: what torch.compile did, and whether it stalled the clock
    if isinstance(compiled, dict):
        in_loop = sum(v for v in (compiled.get("graphs_in_loop"),
                                  compiled.get("recompiles_in_loop"))
                      if contract.finite_number(v))
        out.append(f"- compilation ({compiled.get('backend')}): {compiled.get('graphs')} graphs, "
                   f"{compiled.get('graph_breaks')} graph breaks, "
                   f"{compiled.get('recompiles')} recompiles; "
                   + (f"**{compiled.get('graphs_in_loop')} graphs and "
                      f"{compiled.get('recompiles_in_loop')} recompiles during the timed loop** "
                      f"(each one stalled the training clock: make shapes and Python values the "
                      f"compiled code sees constant)" if in_loop else "none during the timed loop"))
    if st["ok"]:
        stability = "stable" if st["cv"] < 0.1 else "unstable"
        out.append(f"- step time: median {st['median_ms']:.0f} ms (p10 {st['p10_ms']:.0f}, "
                   f"p90 {st['p90_ms']:.0f}, max {st['max_ms']:.0f}); CV {st['cv']:.2f} "
                   f"({stability}); {st['slow_steps']} steps over 2× the median")
    else:
        out.append(f"- step time: {st['reason']}")
    return out


def _trajectory_section(ctx) -> list:
    t = ctx["trajectory"]
    out = [f"Over {t['n_timed']} timed steps ({t['warmup_steps']} clock-warmup steps excluded).",
           ""]
    tail = t["tail"]
    if tail["ok"]:
        state = "**still improving**" if tail["improving"] else "**not improving** (flat or noisy)"
        out.append(f"- tail (steps {tail['from_step']}–{tail['to_step']}): slope "
                   f"{tail['slope'] * 1000:+.4f} nats per 1000 steps "
                   f"(± {tail['stderr'] * 1000:.4f}), one-sided p = {tail['p_value']:.3g} → "
                   f"{state}; the loss moved {tail['change_over_tail']:+.4f} over the tail")
    else:
        out.append(f"- tail slope: not computed ({tail['reason']})")
    pl = t["power_law"]
    if pl["ok"]:
        out.append(f"- power-law fit L(s) = {pl['l_inf']:.3f} + {pl['a']:.3g}·s^-"
                   f"{pl['alpha']:.3f} (R² = {pl['r2']:.3f}): {pl['at_last']:.4f} at the last "
                   f"step; {pl['extrapolate_factor']:.0f}× the steps would reach about "
                   f"{pl['at_extrapolated']:.4f} (schedules scale with the budget, so read it as "
                   f"a trend)")
    else:
        out.append(f"- power-law fit: not available ({pl['reason']})")
    out.append(_divergence_line(t.get("divergence")))
    spikes = t["spikes"]
    if spikes:
        out.append(f"- loss spikes: {len(spikes)} (robust z > {stats.SPIKE_Z:g} against the "
                   f"trailing {stats.SPIKE_WINDOW} steps)")
        for s in spikes[:MAX_TABLE_ROWS]:
            rec = (f"back to baseline after {s['recovered_after']} steps"
                   if s["recovered_after"] is not None else "not recovered")
            out.append(f"  - step {s['step']}: loss {s['loss']:.3f} vs {s['baseline']:.3f} "
                       f"(z {s['z']:.0f}); {rec}")
    else:
        out.append(f"- loss spikes: none (robust z > {stats.SPIKE_Z:g})")
    out.append("")
    return out + _validation_lines(t["val"])


def _divergence_line(div) -> str:
    """The loss trajectory's line on the divergence from the best (stats.divergence's result, or
    None without a best)."""
    if div is None:
        return "- divergence from the best: no best run to compare with"
    if not div["ok"]:
        return f"- divergence from the best: not computed ({div['reason']})"
    if div["diverged"]:
        return (f"- divergence from the best: the curves parted at step "
                f"{div['separated_at']} and this run has been **{div['direction']}** beyond "
                f"the noise (±{div['threshold']:.4f}) since step {div['beyond_noise_from']}; "
                f"gap over the last 10 % of shared steps {div['final_gap']:+.4f} nats/token")
    return (f"- divergence from the best: none — within ±{div['threshold']:.4f} "
            f"nats/token at the end of {div['shared_steps']} shared steps "
            f"(final gap {div['final_gap']:+.4f})")


def _validation_lines(val: list) -> list:
    """The validation curve as a table (at most MAX_TABLE_ROWS points, spread over the run) and
    the trend of the train/val gap."""
    if not val:
        return ["No validation points in metrics.jsonl."]
    out = ["Validation curve (small fixed slice; the final val_bpb uses the full eval set):", "",
           "| step | time (s) | val bpb | val loss | train loss (EMA) | gap (val − train) |",
           "|---|---|---|---|---|---|"]
    for i in sorted(set(np.linspace(0, len(val) - 1, min(len(val), MAX_TABLE_ROWS))
                        .round().astype(int))):
        row = val[i]
        out.append(f"| {row['step']} | {row['time_s']:.0f} | {row['val_bpb']:.4f} | "
                   f"{_f(row['val_loss'], 4)} | "
                   f"{row['train_loss_smooth']:.4f} | {_f(row['gap'], 4, signed=True)} |")
    gaps = [v["gap"] for v in val if v["gap"] is not None]
    if len(gaps) >= 2:
        trend = "widening (overfitting or train/val shift)" if gaps[-1] > gaps[0] + 0.02 else \
            "narrowing" if gaps[-1] < gaps[0] - 0.02 else "steady"
        out.append(f"\ntrain/val gap {gaps[0]:+.4f} → {gaps[-1]:+.4f} nats/token: {trend}")
    return out


def _layers_section(ctx) -> list:
    layers = ctx["trajectory"]["layers"]
    if not layers["n_params"]:
        return ["No per-layer statistics in metrics.jsonl."]
    out = [f"{layers['n_params']} parameter matrices measured."]
    if layers["outliers"]:
        out.append("")
        out.append(f"Outlier layers (robust z > {stats.LAYER_OUTLIER_Z:g} against the same matrix "
                   f"in other layers, median over the run):")
        for o in layers["outliers"][:MAX_TABLE_ROWS]:
            out.append(f"- `{o['name']}` {o['stat']}: {o['value']:.3g} = {o['ratio']:.2f}× the "
                       f"typical {o['typical']:.3g} (z {o['z']:+.1f})")
    else:
        out.append("No outlier layers in gradient norm or update ratio.")
    too_few = layers["kinds_with_too_few_layers"]
    if too_few:
        out.append(f"(outliers need ≥ {stats.MIN_LAYERS_FOR_OUTLIERS} layers of a kind; "
                   f"{len(too_few)} kinds have fewer)")
    flagged = [d for d in layers["drift"] if d["flag"]]
    out.append("")
    if flagged:
        out.append(f"Weight norms that changed by {stats.NORM_CHANGE_FLAG:g}× or more from a "
                   f"quarter into the run to its end:")
        for d in flagged[:MAX_TABLE_ROWS]:
            out.append(f"- `{d['name']}`: {d['first']:.3g} at step {d['from_step']} → "
                       f"{d['last']:.3g} ({d['ratio']:.2f}×)")
    elif layers["drift"]:
        ratios = [d["ratio"] for d in layers["drift"]]
        out.append(f"Weight norms stayed within {stats.NORM_CHANGE_FLAG:g}× from a quarter into "
                   f"the run to its end (last/first from {min(ratios):.2f} to {max(ratios):.2f}).")
    return out


def analysis_md(ctx: dict) -> str:
    r = ctx["record"]
    data = r.get("data") or {}
    out = [f"# Run {r['run_id']} — {r['description']}", "",
           f"commit `{r['commit']}` · seed {r.get('seed')} · status **{r['status']}** · "
           f"device {r.get('device')} · started {r.get('started_at')} · "
           f"data {data.get('source')}"
           + (" (SMOKE-TEST corpus)" if data.get("smoke_test") else ""), ""]
    for note in r.get("notes", []):
        out.append(f"> note: {note}")
    out += ["", "## Result", ""] + [f"- {line}" for line in result_lines(ctx)]
    out += ["", "## Verdict", ""] + _verdict_section(ctx)
    if r.get("integrity"):
        out += ["", "## Integrity", "", "**INVALID**: this run's val_bpb is not comparable and is "
                "never kept, pooled or counted as the best. What does not check out:",
                ""] + [f"- {p}" for p in r["integrity"]]
    if ctx.get("traceback"):
        out += ["", "## Crash", "", "The end of run.log:", "", "```", ctx["traceback"], "```"]
    out += ["", "## Configuration vs best", ""] + _config_section(ctx)
    out += ["", "## Performance", ""] + _performance_section(ctx)
    out += ["", "## Loss trajectory", ""] + _trajectory_section(ctx)
    out += ["", "## Per-layer statistics", ""] + _layers_section(ctx)
    agent = ctx["trajectory"].get("agent")
    if agent:
        out += ["", "## Agent metrics", "",
                f"Logged by train.py under `{contract.AGENT_PREFIX}`:", "",
                "| key | points | first | last (step) | min | max |", "|---|---|---|---|---|---|"]
        out += [f"| `{k}` | {m['points']} | {m['first']:.6g} | {m['last']:.6g} "
                f"({m['last_step']}) | {m['min']:.6g} | {m['max']:.6g} |" for k, m in agent.items()]
    out += ["", "## Plots", "", "Each overlays this run with the best and the previous run:", ""]
    out += [f"- [{name}]({name})" for name in ctx["plots"]]
    out += ["", "Files: run_summary.json, metrics.jsonl, run.log, train.py (snapshot), "
            "diff.patch (against the best).", "", NOTES_HEADING, "",
            f"{NOTES_POINTER} `{STORE_DIR}/{NOTES_DIR}/{r['run_id']}.md`.", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------
# insights.md, status, compare
# ---------------------------------------------------------------------------

INSIGHTS_TEMPLATE = """# Insights

{block}

## Validated findings

## Disproved ideas
"""


def current_best_block(best_records: list) -> str:
    first = best_records[0]
    values = [r["val_bpb"] for r in best_records]
    sd = f", sd {np.std(values, ddof=1):.6f}" if len(values) > 1 else ""
    return "\n".join([
        BEST_BEGIN, "## Current Best", "",
        f"- commit: `{first['commit']}` — {first.get('description')}",
        f"- val_bpb: {np.mean(values):.6f} (mean of {len(values)} run(s){sd})",
        f"- runs pooled: {len(values)} ({', '.join(r['run_id'] for r in best_records)})",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}",
        f"- device: {first.get('device')}, budget {first.get('time_budget_s')} s",
        BEST_END])


def with_current_best(text, best_records: list) -> str:
    """insights.md with its Current Best block replaced (or placed at the top; created if
    needed)."""
    block = current_best_block(best_records)
    if not text:
        return INSIGHTS_TEMPLATE.format(block=block)
    if BEST_BEGIN in text and BEST_END in text:
        head, rest = text.split(BEST_BEGIN, 1)
        return head + block + rest.split(BEST_END, 1)[1]
    lines = text.splitlines(keepends=True)
    at = 1 if lines and lines[0].startswith("# ") else 0
    return "".join(lines[:at]) + "\n" + block + "\n\n" + "".join(lines[at:]).lstrip("\n")


def worker_progress(ledger: list, live_claims=()) -> list:
    """[{worker, runs, counts, latest, best, testing}] of a night with several workers, in order of
    their first run; [] for one agent."""
    names = list(dict.fromkeys(worker_of(r) for r in ledger))
    names += [c["worker"] for c in live_claims if c["worker"] not in names]
    if names in ([], [MAIN_WORKER]):
        return []
    out = []
    for name in names:
        runs = [r for r in ledger if worker_of(r) == name]
        counts = {}
        for r in runs:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        values = [r["val_bpb"] for r in runs
                  if r["status"] not in verdict.NOT_COUNTED and r.get("val_bpb") is not None]
        out.append({"worker": name, "runs": len(runs), "counts": counts,
                    "latest": runs[-1] if runs else None,
                    "best": min(values) if values else None,
                    "testing": next((c["idea"] for c in live_claims if c["worker"] == name), None)})
    return out


def worker_lines(ledger: list, live_claims=()) -> list:
    """`status`'s per-worker progress: runs, their statuses, the latest run and the idea it is
    testing."""
    progress = worker_progress(ledger, live_claims)
    out = ["workers:"] if progress else []
    for w in progress:
        line = f"  {w['worker']:<8} {w['runs']} run(s)"
        if w["counts"]:
            line += " (" + ", ".join(f"{n} {s}" for s, n in w["counts"].items()) + ")"
        if w["latest"]:
            line += f", latest {w['latest']['run_id']} {w['latest']['status']}"
        out.append(line + (f"; testing: {w['testing']}" if w["testing"] else ""))
    return out


def agent_line(ledger: list) -> list:
    """`status`'s line naming the agents and models of the latest night's sessions (its rows'
    `agent`, nights.agents_of), e.g. "agent: codex gpt-5-codex (7 of the latest night's 9 runs)";
    none where that night recorded none (runs by hand, older rows)."""
    spans = nights.night_spans(ledger)
    if not spans:
        return []
    first, end = spans[-1]
    agents = nights.agents_of(ledger[first:end])
    of_night = f"the latest night's {end - first} run(s)"
    if len(agents) == 1:
        return [f"agent: {agents[0][0]} ({agents[0][1]} of {of_night})"]
    return [f"agents: {', '.join(f'{a} ({n})' for a, n in agents)} of {of_night}"] if agents else []


LEDGER_BANNER = "!!! LEDGER BROKEN, no numbers shown !!!"  # status's first words on a broken one
RED, PLAIN = "\033[1;97;41m", "\033[0m"  # bold white on red, for a terminal only


def ledger_banner(error, colour: bool) -> str:
    """`status`'s one line in place of the numbers of a broken ledger (a store.LedgerError): the
    first broken row and what to do, red on a terminal."""
    line = f"{LEDGER_BANNER} {error}"
    return f"{RED}{line}{PLAIN}" if colour else line


def reseal_lines(reseals: list) -> list:
    """`status`'s reminder that the ledger was accepted by hand after it broke (store.reseals)."""
    if not reseals:
        return []
    last = reseals[-1]
    return [f"note: this ledger was resealed by hand {len(reseals)} time(s) (`analyze.py reseal`); "
            f"last at {last.get('at')}, when {last.get('broken')}"]


def seed_share_line(share: dict) -> str:
    """How much of the noise runs under the same SEED share, as the store measures it
    (pairing.store_share)."""
    if share["rho"] is None:
        return ("seed pairing: no estimate yet (it needs the noise σ and an idea run at least "
                "twice under the best's seeds)")
    return (f"seed pairing: ρ = {share['rho']:.2f} of the noise shared by runs under the same "
            f"SEED (raw {share['raw']:.2f} from {share['df']} paired df over {share['codes']} "
            f"idea(s), shrunk toward 0 while few)")


def status_text(ledger: list, best_records, noise: dict, orphans: list, last_n: int, mode: str,
                live_claims=(), seed_share: dict = None, confirmed: dict = None) -> str:
    counts = {}
    for r in ledger:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    out = []
    if best_records:
        out.append(f"best: {best_records[0]['commit']} val_bpb {_pooled_mean(best_records):.6f} "
                   f"(pooled over {len(best_records)} run(s): "
                   f"{', '.join(r['run_id'] for r in best_records)}) "
                   f"— {best_records[0].get('description')}")
    else:
        out.append("best: none yet (`uv run analyze.py keep` marks the baseline)")
    if confirmed is not None:  # the latest night's confirmation (night/confirm.py)
        out.append(confirmation.describe(confirmed))
    if noise["trusted"]:
        out.append(f"noise: σ = {noise['sigma']:.6f} per run ({noise['df']} df from "
                   f"{noise['n_groups']} repeated commit(s))")
    else:
        out.append(f"noise: no estimate yet ({noise['df']} df < {verdict.MIN_NOISE_DF}): run the "
                   f"same commit with other SEEDs")
    if seed_share is not None:
        out.append(seed_share_line(seed_share))
    out.append(f"verdict mode: {mode}"
               + (" (the default)" if mode == verdict.VERDICT_MODE else
                  f" (${verdict.VERDICT_ENV}; default {verdict.VERDICT_MODE})"))
    out.append("runs: " + ", ".join(f"{counts[s]} {s}"
                                     for s in sorted(counts, key=lambda s: -counts[s]))
               + f" ({len(ledger)} total)")
    out += agent_line(ledger)
    out += worker_lines(ledger, live_claims)
    out.append(f"latest {min(last_n, len(ledger))}:")
    for r in ledger[-last_n:]:
        value = f"{r['val_bpb']:.6f}" if r.get("val_bpb") is not None else "—"
        agent = f"  [{r['agent']}]" if r.get("agent") else ""  # its session's agent and model
        out.append(f"  {r['run_id']:<14} {value:>9}  {r['status']:<8} {r.get('verdict') or '':<8} "
                   f"{r.get('description') or ''}{agent}")
    if orphans:
        out.append(f"archives without a ledger row (an interrupted analyze): {', '.join(orphans)}")
    return "\n".join(out)


def compare_md(a: dict, b: dict, diff: list, traj: dict, plot_path) -> str:
    out = [f"# {a['run_id']} vs {b['run_id']}", "",
           f"- {a['run_id']}: {a.get('description')} (status {a['status']})",
           f"- {b['run_id']}: {b.get('description')} (status {b['status']})", "",
           "| metric | " + a["run_id"] + " | " + b["run_id"] + " | difference |",
           "|---|---|---|---|"]
    for key in ("val_bpb", "num_steps", "total_tokens_M", "mfu_percent", "peak_vram_mb",
                "training_seconds", "num_params_M"):
        va, vb = a.get(key), b.get(key)
        both = isinstance(va, (int, float)) and isinstance(vb, (int, float))
        out.append(f"| {key} | {va if va is not None else '—'} | "
                   f"{vb if vb is not None else '—'} | {f'{va - vb:+.6g}' if both else '—'} |")
    out += ["", "Configuration (changed constants):", ""]
    out += [f"- `{k}`: {vb} → {va}" for k, vb, va in diff] or ["- identical"]
    div = traj.get("divergence")
    out.append("")
    if div and div.get("ok") and div["diverged"]:
        out.append(f"Loss curves parted at step {div['separated_at']}; {a['run_id']} has been "
                   f"{div['direction']} beyond the noise since step {div['beyond_noise_from']} "
                   f"(final gap {div['final_gap']:+.4f} nats/token).")
    elif div and div.get("ok"):
        out.append(f"Loss curves stay within ±{div['threshold']:.4f} nats/token "
                   f"(final gap {div['final_gap']:+.4f}).")
    else:
        out.append(f"Loss curves not compared: {div['reason'] if div else 'no metrics'}.")
    out += ["", f"Overlay: {plot_path}"]
    return "\n".join(out)
