"""
The end-of-night confirmation (issue 21, item 6): in the night's last stretch the supervisor, once
the agent is gone and its last run settled, runs the night's best and the best the night started
from again, each pair under a fresh SEED that no run in the store used, and writes what they say
into the store (CONFIRMATION_FILE). The in-night gain is optimistic (the best is the luckiest of
many runs); these runs were not selected on, so their paired difference is an honest estimate, and
the morning report headlines it beside the in-night number.

The runs are launch.py's, as the night's runner starts them (train.py in its box where the night's
agent was boxed), in a git worktree of the settled HEAD whose train.py is the confirmed code's, so
the repository's own run files and the ledger are untouched.
"""

import json
import subprocess
import time

import numpy as np

from analysis import confirmation, pairing, verdict
from analysis.store import CONFIRMATION_FILE
from harness import contract, git, settings
from night.environment import harness_command, harness_environment

CONFIRM_RUNS = 4            # the stretch's runs: two fresh seeds, the best and the baseline each
DEFAULT_CONFIRM_MINUTES = 28  # four runs of the 5-minute budget plus the 106 s of startup and
                              # evaluation one took on an H200 (BENCHMARKS.md), rounded up
SHORT_NIGHT_FACTOR = 4       # the default stretch only in a night at least 4 times its length:
                             # in a shorter one it would take the runs the ideas need
WORKTREE = ".worktrees/confirm"  # gitignored, as the workers' worktrees
RUN_LOG_TAIL = 2000         # characters of a failed confirmation run's output kept in its record


def stretch_minutes(hours, asked, several: bool) -> tuple:
    """(minutes of the confirmation stretch, a note for the start line or None): `asked` is
    --confirm-minutes (None: the default where the night is long enough); none without a deadline
    or in a night of several workers."""
    if hours is None or several:
        why = "no deadline (--hours)" if hours is None else "a night of several workers"
        return 0, (f"no confirmation stretch: {why}" if asked else None)
    if asked is not None:
        return asked, None
    if hours * 60 >= SHORT_NIGHT_FACTOR * DEFAULT_CONFIRM_MINUTES:
        return DEFAULT_CONFIRM_MINUTES, None
    return 0, (f"no confirmation stretch: a {hours:g} h night is too short for the default "
               f"{DEFAULT_CONFIRM_MINUTES} minutes (--confirm-minutes M sets one)")


def plan(ledger: list, start_rows: int):
    """(best records, baseline records) of the confirmation: the store's best now and the best the
    night started from (the night's first kept code, when the store had none), each a code's pool
    of ledger records; or (None, why) when there is nothing to confirm."""
    comparable = verdict.store_comparable(ledger)
    best = verdict.best_pool(ledger, comparable)
    if best is None:
        return None, "nothing was kept: there is no best to confirm"
    before = ledger[:start_rows]
    start = verdict.best_pool(before, comparable) if before else None
    if start is None:
        night_kept = [r for r in ledger[start_rows:] if r.get("status") == "keep"
                      and verdict.comparable_key(r) == comparable]
        if not night_kept:
            return None, "the night kept nothing comparable with the best"
        key = verdict.code_key(night_kept[0])
        start = key, verdict.pools(ledger, comparable)[key]
    if start[0] == best[0]:
        return None, "the best is still the code the night started from: no gain to confirm"
    return (best[1], start[1]), None


def fresh_seeds(ledger: list, count: int) -> list:
    """`count` SEEDs above every seed a run in the store used: none of them saw these."""
    used = [r.get("seed") for r in ledger]
    top = max([s for s in used if isinstance(s, int) and not isinstance(s, bool)],
              default=settings.BASELINE_SEED)
    return list(range(top + 1, top + 1 + count))


def typical_run_s(records: list) -> float:
    """A run's wall time as the confirmed codes' runs took it (the median of their
    total_seconds; 0 where none is recorded): what a pair must have left before the deadline."""
    seconds = [r["total_seconds"] for r in records
               if isinstance(r.get("total_seconds"), (int, float))]
    return float(np.median(seconds)) if seconds else 0.0


def in_night_figures(ledger: list, best: list, baseline: list) -> dict:
    """The in-night gain (the baseline's pooled mean less the best's), and the store's noise and
    seed share the confirmed interval uses."""
    comparable = verdict.store_comparable(ledger)
    groups = verdict.pools(ledger, comparable)
    noise = verdict.noise_estimate([[r["val_bpb"] for r in g] for g in groups.values()])
    share = pairing.store_share(groups, verdict.code_key(best[0]), noise.get("sigma"))
    means = [float(np.mean([r["val_bpb"] for r in pool])) for pool in (best, baseline)]
    return {"in_night_gain": means[1] - means[0], "best_mean": means[0],
            "baseline_mean": means[1], "sigma": noise["sigma"] if noise["trusted"] else None,
            "df": noise["df"], "rho": share["rho"]}


class Confirmation:
    """The stretch's runs for one supervisor (sup: night.supervisor.Supervisor): run() starts them,
    pair by pair, while the deadline leaves room for a pair (twice the longest run yet, or before
    the first, twice typical_run_s), and writes the result."""

    def __init__(self, sup):
        self.sup, self.repo = sup, sup.repo.resolve()
        self.worktree = self.repo / WORKTREE

    def run(self):
        ledger = self.sup._ledger()
        pools, why = plan(ledger, self.sup.start_rows)
        if pools is None:
            self.sup.status(f"confirmation skipped: {why}")
            return None
        best, baseline = pools
        seeds = fresh_seeds(ledger, CONFIRM_RUNS // 2)
        record = {"night_started_at": contract.stamp(self.sup.started),
                  "best": self._code(best), "baseline": self._code(baseline),
                  "seeds": seeds, "runs": [], **in_night_figures(ledger, best, baseline)}
        self.sup.status(f"confirmation: the best ({record['best']['commit'][:7]}) and the night's "
                        f"starting baseline ({record['baseline']['commit'][:7]}) under fresh "
                        f"SEEDs {', '.join(map(str, seeds))}")
        self._add_worktree()
        try:
            longest = typical_run_s(best + baseline)
            for seed in seeds:
                left = self._left()
                if left is not None and left < 2 * longest:
                    self.sup.status(f"confirmation: {left:.0f} s left before the deadline, a pair "
                                    f"takes ~{2 * longest:.0f} s: no more pairs")
                    break
                for name in ("best", "baseline"):
                    started = time.monotonic()
                    record["runs"].append(self._one_run(name, record[name], seed))
                    longest = max(longest, time.monotonic() - started)
                    if self.sup.immediate:  # a signal during the stretch: stop at once
                        break
                if self.sup.immediate:
                    break
        finally:
            self._remove_worktree()
        record["result"] = self._result(record)
        contract.atomic_write(self.sup.store.path(CONFIRMATION_FILE),
                              json.dumps(record, indent=1) + "\n")
        self.sup.status(confirmation.describe(record))
        return record

    def _code(self, pool: list) -> dict:
        first = pool[0]
        return {"commit": first.get("commit") or "", "train_sha256": verdict.code_key(first),
                "run_ids": [r["run_id"] for r in pool]}

    def _left(self):
        deadline = self.sup.rules.deadline
        return None if deadline is None else deadline - time.time()

    def _add_worktree(self):
        self._remove_worktree()  # one a killed night left
        git.git("worktree", "add", "--quiet", "--detach", str(self.worktree), "HEAD",
                cwd=self.repo)

    def _remove_worktree(self):
        if self.worktree.exists():
            git.git("worktree", "remove", "--force", str(self.worktree), cwd=self.repo)
        git.git("worktree", "prune", cwd=self.repo)

    def _one_run(self, name: str, code: dict, seed: int) -> dict:
        """One launch.py of `code` under SEED `seed` in the worktree: its record."""
        source = git.git("show", f"{code['commit']}:{contract.TRAIN_PY}", cwd=self.repo)
        (self.worktree / contract.TRAIN_PY).write_text(source)
        env = harness_environment(self.sup.args.pass_env, night=self.sup.night)
        if self.sup.unboxed:
            env["SEED"] = str(seed)
        else:  # train.py is the agent's code: in its box, as every run of the night
            env.update({settings.TRAIN_BOX_ENV: "1",
                        settings.TRAIN_VARIABLES_ENV: json.dumps({"SEED": str(seed)})})
        self.sup.status(f"confirmation run: the {name} under SEED {seed}")
        done = subprocess.run(harness_command("launch.py"), cwd=self.worktree, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=self.sup.args.train_timeout)
        self.sup.write_log(f"[confirm] {name} SEED {seed}: launch.py -> exit {done.returncode}\n"
                           f"{done.stdout}{done.stderr}")
        out = {"code": name, "seed": seed, "val_bpb": None}
        try:
            summary = json.loads((self.worktree / contract.RUN_SUMMARY).read_text())
        except (OSError, ValueError) as e:
            return {**out, "status": "crash", "error": f"no run summary: {e}",
                    "output_tail": (done.stdout + done.stderr)[-RUN_LOG_TAIL:]}
        out.update(status=summary.get("status"), started_at=summary.get("started_at"))
        causal = (summary.get("causality") or {}).get("ok") is not False
        if (done.returncode == 0 and summary.get("status") == "ok" and summary.get("evaluator")
                and causal):
            out["val_bpb"] = summary["val_bpb"]
        else:
            out["error"] = (summary.get("error") or ("reads the future (causality probe)"
                            if not causal else f"launch.py exited {done.returncode}"))
        return out

    def _result(self, record: dict):
        """confirmation.confirmed_gain over the seeds both codes finished, or None with none."""
        values = {(r["code"], r["seed"]): r["val_bpb"] for r in record["runs"]
                  if r["val_bpb"] is not None}
        paired = [s for s in record["seeds"] if ("best", s) in values
                  and ("baseline", s) in values]
        if not paired:
            return None
        return {**confirmation.confirmed_gain(
                    [values["best", s] for s in paired], [values["baseline", s] for s in paired],
                    sigma=record["sigma"], df=record["df"], rho=record["rho"]),
                "seeds": paired}
