"""
The stop rules of a night, as pure functions of the ledger rows it added and the clock.
"""

import time
from dataclasses import dataclass

from harness.contract import parse_stamp
from analysis import verdict


def hhmm(t: float) -> str:
    """A wall-clock time as the status lines give it."""
    return time.strftime("%H:%M", time.localtime(t))


def run_counts(runs: list) -> str:
    counts = {s: sum(r.get("status") == s for r in runs) for s in ("keep", "discard", "crash")}
    return (f"{len(runs)} experiments ({counts['keep']} keep, {counts['discard']} discard, "
            f"{counts['crash']} crash)")


@dataclass
class StopRules:
    deadline: float = None             # epoch seconds
    max_experiments: int = None
    max_consecutive_crashes: int = 3
    max_without_keep: int = None       # experiments in a row without a keep
    max_hours_without_keep: float = None
    confirm_from: float = None         # epoch seconds: the confirmation stretch starts here


# the stop reason of the night's last stretch, which the supervisor spends on the confirmation
CONFIRM_STRETCH = "confirmation stretch"


def stop_reason(new_runs: list, rules: StopRules, now: float, started: float,
                own_runs: list = None):
    """Why the night should end, from the ledger rows added since the night started; None to go on.
    With several workers every rule counts the rows of all of them, except crashes in a row: those
    are `own_runs`, the worker's own (a broken GPU stops its worker, not the night)."""
    if rules.deadline is not None and now >= rules.deadline:
        return f"deadline reached ({hhmm(rules.deadline)})"
    if rules.confirm_from is not None and now >= rules.confirm_from:
        return (f"{CONFIRM_STRETCH} from {hhmm(rules.confirm_from)}: the best and the night's "
                f"starting baseline run on fresh seeds until {hhmm(rules.deadline)}")
    if rules.max_experiments is not None and len(new_runs) >= rules.max_experiments:
        return f"experiment budget used ({len(new_runs)} runs)"
    n, own = rules.max_consecutive_crashes, new_runs if own_runs is None else own_runs
    if n and len(own) >= n and all(r["status"] in verdict.FAILED_STATUSES for r in own[-n:]):
        return f"{n} crashes in a row: {own[-1].get('error') or 'see the latest analysis.md'}"
    kept = [i for i, r in enumerate(new_runs) if r["status"] == "keep"]
    since_keep = len(new_runs) - (kept[-1] + 1 if kept else 0)
    if rules.max_without_keep is not None and since_keep >= rules.max_without_keep:
        return f"no keep in the last {since_keep} experiments"
    if rules.max_hours_without_keep is not None:
        last = max([started] + [parse_stamp(new_runs[i].get("analyzed_at")) or started
                                for i in kept])
        if now - last >= rules.max_hours_without_keep * 3600:
            return f"no keep for {(now - last) / 3600:.1f} hours"
    return None


def describe_rules(rules: StopRules) -> str:
    parts = []
    if rules.deadline is not None:
        parts.append(f"deadline {time.strftime('%Y-%m-%d %H:%M', time.localtime(rules.deadline))}")
    if rules.confirm_from is not None:
        parts.append(f"confirmation from {hhmm(rules.confirm_from)}")
    for label, value in (("max experiments", rules.max_experiments),
                         ("max crashes in a row", rules.max_consecutive_crashes),
                         ("max without keep", rules.max_without_keep),
                         ("max hours without keep", rules.max_hours_without_keep)):
        if value is not None:
            parts.append(f"{label} {value:g}")
    return ", ".join(parts) or "none"
