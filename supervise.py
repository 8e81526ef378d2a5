"""
The unattended overnight loop: keeps an agent running experiments (program.md) until a deadline, an
experiment budget or a stop rule, and leaves the store and git consistent however it ends.

    uv run supervise.py --backend claude --hours 8     # your Claude Code, `claude -p`, restarted whenever it exits
    uv run supervise.py --backend api --hours 8        # a built-in agent on the Anthropic API (ANTHROPIC_API_KEY)

No state lives only in an agent's context: every restart (claude) or experiment (api) starts fresh
from program.md, insights.md, ideas_queue.md and results.tsv. A training run that exceeds its
wall-clock limit is killed. A stop rule lets the experiment in progress finish (up to --stop-grace),
then the supervisor ends every process of the night and settles the last run (keep or discard), so
git and the ledger agree. Progress: `tail -f .auto-log-research/status.log`; every agent session's
output and tool call is in .auto-log-research/supervisor.log; the morning report, .auto-log-research/report.html,
is rewritten after every change of the ledger.
"""

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from analysis import claims, gitops, verdict
from analysis.store import (IDEAS, INSIGHTS, RESULTS_TSV, STORE_DIR, WORKER_ENV, WORKER_PID_ENV, Store, StoreError,
                            parse_stamp, proc_stat, worker_of)
from launch import DEFAULT_GRES, LAUNCHER_ENV, LAUNCHERS, SLURM_ENV
# The budget train.py will run with, read and checked once, by the harness: a bad
# $AUTORESEARCH_TIME_BUDGET ends the supervisor here with prepare.py's one `error:` line.
from prepare import TIME_BUDGET

PROGRAM = "program.md"
STATUS_LOG = "status.log"            # one line per event, in the store: `tail -f` it
SUPERVISOR_LOG = "supervisor.log"    # every agent session's output and every tool call
PID_FILE = "supervisor.pid"          # the running night, so the next start can find what a killed one left
NIGHT_ENV = "AUTORESEARCH_NIGHT"     # marks every process of a night, through setsid and re-parenting
# unattended: no permission prompts; stream-json so that every tool call and result reaches the log
DEFAULT_CLAUDE_COMMAND = "claude -p --dangerously-skip-permissions --output-format stream-json --verbose"
DEFAULT_MODEL = "claude-sonnet-4-5"
QUICK_EXIT_S = 60                    # a claude session shorter than this without an experiment is a failed start
MAX_QUICK_EXITS = 5                  # ... and this many in a row stop the night (not logged in, bad command, ...)
RESTART_DELAY_S = 10.0               # pause before restarting an agent; doubles after each failed session
MAX_BACKOFF_S = 900.0                # ... up to 15 minutes
DEFAULT_MAX_OUTAGE_H = 1.0           # failed sessions (API down, 5xx, 401) for this long end the night
TOOL_TIMEOUT_MARGIN_S = 600          # the CLI's Bash timeout: the training limit plus this, for analyze and git
POLL_S = 2.0                         # how often stop rules and training runs are checked
REPORT = ".auto-log-research/report.html"  # the morning report, rewritten after every change of the ledger
REPORT_TIMEOUT_S = 120               # `analyze.py report` takes about a second for 500 runs; this only ends a hang
KILL_GRACE_S = 15.0                  # SIGTERM first (train.py writes its crash summary), SIGKILL after this
API_MAX_RETRIES = 8                  # the SDK's own retries (429, 5xx, connection) with exponential backoff
API_OUTAGE_WAIT_S = 60.0             # then wait this long (doubling, up to 15 min) and retry, up to --max-outage-hours
API_MAX_TOKENS = 8192
MAX_TURNS_PER_EXPERIMENT = 60        # tool calls in one api experiment before it is cut off
TOOL_OUTPUT_CHARS = 12_000           # the tail of a command's output returned to the model
TRIMMED_RESULT_CHARS = 2_000         # what an old tool result keeps when the context grows too long
LOG_RESULT_CHARS = 2_000             # the tail of a tool result written to supervisor.log
DEFAULT_TOOL_TIMEOUT_S = 600         # a shell command's default limit (training has its own, below)
CTRL_C = "stopped by Ctrl-C"
SIGNALLED = "stopped by a signal"
ROOT_REFUSAL = ("running as root: Claude Code refuses --dangerously-skip-permissions as root. Run the night "
                "as a non-root user, or, inside a container or VM you are willing to let the agent own, set "
                "IS_SANDBOX=1 (Claude Code's variable for sandboxed environments); see README, 'Threat model'")
# What the agent's processes may see of the supervisor's environment (plus --pass-env): no cloud,
# Hugging Face or GitHub tokens, no ssh agent, unless the user names them.
ENV_ALLOW = {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "LANGUAGE", "TZ", "TMPDIR",
             "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "IS_SANDBOX",
             "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
             "VIRTUAL_ENV", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED",
             "GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"}
ENV_ALLOW_PREFIXES = ("LC_", "XDG_", "AUTORESEARCH_", "CUDA_", "NVIDIA_", "UV_", "TORCH", "TRITON_",
                      "SLURM_", "SBATCH_")  # the cluster's client settings (SLURM_CONF, SBATCH_ACCOUNT): no secrets
CLIENT_ENV_PREFIXES = ("ANTHROPIC_", "CLAUDE_", "DISABLE_")  # the claude CLI's own settings (its key too)
RESUME_PROMPT = """You are resuming an autoresearch session that was interrupted; your earlier context is gone.
Read program.md and follow its loop. The state of the research is on disk, not in your memory:
- .auto-log-research/insights.md (the Current Best block and validated findings),
- .auto-log-research/ideas_queue.md (prioritised hypotheses),
- .auto-log-research/results.tsv (every run so far; `uv run analyze.py status` summarises it).
Check `git status` and `git log -3` first: finish or revert any half-done experiment, then continue the loop.
Never stop to ask; keep experimenting."""


def worker_file(name: str, worker) -> str:
    """A night file of one worker (supervisor-gpu0.log) beside the night's own (supervisor.log)."""
    if not worker:
        return name
    stem, dot, ext = name.partition(".")
    return f"{stem}-{worker}{dot}{ext}"


def run_counts(runs: list) -> str:
    counts = {s: sum(r.get("status") == s for r in runs) for s in ("keep", "discard", "crash")}
    return f"{len(runs)} experiments ({counts['keep']} keep, {counts['discard']} discard, {counts['crash']} crash)"


def hhmm(t: float) -> str:
    """A wall-clock time as the status lines give it."""
    return time.strftime("%H:%M", time.localtime(t))


def default_train_limit() -> float:
    """Hard wall-clock limit of one training run: twice the budget plus 5 minutes for startup and evals
    (train.py's own watchdog allows more, so this is the outer bound)."""
    return 2 * TIME_BUDGET + 300


def agent_environment(extra_names=(), client=False, night=None) -> dict:
    """The environment of the agent and its commands: the allowlist, the names the user passed, the
    night's marker, and (for the claude CLI itself, `client`) its own ANTHROPIC_/CLAUDE_ settings."""
    def allowed(name):
        return (name in ENV_ALLOW or name in extra_names or name.startswith(ENV_ALLOW_PREFIXES)
                or (client and name.startswith(CLIENT_ENV_PREFIXES)))
    env = {k: v for k, v in os.environ.items() if allowed(k)}
    if night:
        env[NIGHT_ENV] = night
    return env


# ---------------------------------------------------------------------------
# Stop rules (pure)
# ---------------------------------------------------------------------------

@dataclass
class StopRules:
    deadline: float = None             # epoch seconds
    max_experiments: int = None
    max_consecutive_crashes: int = 3
    max_without_keep: int = None       # experiments in a row without a keep
    max_hours_without_keep: float = None


def stop_reason(new_runs: list, rules: StopRules, now: float, started: float, own_runs: list = None):
    """Why the night should end, from the ledger rows added since the night started; None to go on. With
    several workers every rule counts the rows of all of them, except crashes in a row: those are
    `own_runs`, the worker's own (a broken GPU stops its worker, not the night)."""
    if rules.deadline is not None and now >= rules.deadline:
        return f"deadline reached ({hhmm(rules.deadline)})"
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
        last = max([started] + [parse_stamp(new_runs[i].get("analyzed_at")) or started for i in kept])
        if now - last >= rules.max_hours_without_keep * 3600:
            return f"no keep for {(now - last) / 3600:.1f} hours"
    return None


# ---------------------------------------------------------------------------
# Processes, read from /proc: the night's processes, their ages, and ending them
# ---------------------------------------------------------------------------

def _pids() -> list:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def process_age(pid: int):
    """Seconds since the process started (from /proc, so a just-started run is never taken for an old one)."""
    stat = proc_stat(pid)
    if stat is None:
        return None
    return float(Path("/proc/uptime").read_text().split()[0]) - stat[2]


def descendants(pid: int) -> set:
    """Every process below pid (children, their children, ...), as the process table is now."""
    children = {}
    for p in _pids():
        stat = proc_stat(p)
        if stat:
            children.setdefault(stat[1], []).append(p)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def night_processes(marker_prefix: str) -> set:
    """Processes whose environment carries the night marker (NIGHT_ENV=<prefix>...): the agent, its
    commands, training runs, whatever they started, even in sessions of their own or re-parented."""
    needle = f"{NIGHT_ENV}={marker_prefix}".encode()
    me = os.getpid()
    return {p for p in _pids() if p != me and any(v.startswith(needle) for v in _environ(p).split(b"\0"))}


def end_processes(pids, grace: float = KILL_GRACE_S) -> list:
    """SIGTERM every process (train.py writes its crash summary, git removes its lock), SIGKILL those left
    after `grace` seconds, and wait until they are gone. Returns the pids that needed SIGKILL."""
    pids = {p for p in pids if p != os.getpid()}
    _signal_all(pids, signal.SIGTERM)
    left = _wait_gone(pids, grace)
    if left:
        _signal_all(left, signal.SIGKILL)
        _wait_gone(left, grace)
    return sorted(left)


def _signal_all(pids, sig):
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass  # already gone


def _wait_gone(pids, seconds: float) -> set:
    """Wait up to `seconds` for the processes to end; the ones still alive."""
    deadline = time.time() + seconds
    while True:
        for p in pids:
            try:
                os.waitpid(p, os.WNOHANG)  # reap our own children; others are reaped by their parents
            except ChildProcessError:
                pass  # not our child
        pids = {p for p in pids if _alive(p)}
        if not pids or time.time() >= deadline:
            return pids
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def terminate(proc: subprocess.Popen, also=()) -> list:
    """End proc, everything below it (collected before anything is signalled) and `also`."""
    pids = descendants(proc.pid) | {proc.pid} | set(also)
    killed = end_processes(pids)
    proc.wait()
    return killed


def training_processes(repo: Path, *scripts: str) -> list:
    """[(pid, age in seconds)] of the `scripts` (default train.py; launch.py, analyze.py) processes running
    in `repo`, in one pass over the process table."""
    found, names = [], [s.encode() for s in scripts or ("train.py",)]
    for pid in _pids():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if not any(a == name or a.endswith(b"/" + name) for a in args[:4] for name in names):
                continue
            if Path(os.readlink(f"/proc/{pid}/cwd")) != repo.resolve():
                continue  # another repository's run
        except OSError:
            continue  # gone meanwhile, or not ours to read
        age = process_age(pid)
        if age is not None and _alive(pid):
            found.append((pid, age))
    return found


def describe_rules(rules: StopRules) -> str:
    parts = []
    if rules.deadline is not None:
        parts.append(f"deadline {time.strftime('%Y-%m-%d %H:%M', time.localtime(rules.deadline))}")
    for label, value in (("max experiments", rules.max_experiments), ("max crashes in a row", rules.max_consecutive_crashes),
                         ("max without keep", rules.max_without_keep), ("max hours without keep", rules.max_hours_without_keep)):
        if value is not None:
            parts.append(f"{label} {value:g}")
    return ", ".join(parts) or "none"


class Supervisor:
    """One agent's night in one checkout: the whole night with one GPU, or one worker (`--worker`, started by
    a Workers night in its worktree) of a night with several."""

    def __init__(self, args, repo: Path, secret: str = None):
        self.args, self.repo = args, repo
        self.worker = getattr(args, "worker", None)  # None: the only agent of the night
        self.store = Store(repo)
        self.store.dir.mkdir(mode=0o700, exist_ok=True)
        self.rules = StopRules(
            deadline=time.time() + args.hours * 3600 if args.hours else None,
            max_experiments=args.max_experiments, max_consecutive_crashes=args.max_crashes,
            max_without_keep=args.max_without_keep, max_hours_without_keep=args.max_hours_without_keep)
        self.started = time.time()
        # the marker every process of this night carries; a worker's extends its night's, so the night's
        # prefix finds every process of every worker
        self.night = getattr(args, "night", None) or f"{os.getpid()}-{int(self.started)}"
        if self.worker:
            self.night = f"{self.night}-{self.worker}"
        self.stopping = None                 # the reason, once the night is over
        self.stop_seen_at = None             # when a stop rule first fired: the grace runs from here
        self.immediate = False               # a signal: stop now, no grace for the experiment in progress
        self.failed = False                  # the night itself failed (cannot start, outage): exit non-zero
        self.store_problem = None
        self.log = open(self.store.path(worker_file(SUPERVISOR_LOG, self.worker)), "a", buffering=1)
        self.secret = secret
        self.current = None                  # the running tool command of the api backend
        self.rows_seen, self.start_rows = [], 0
        night_rows = getattr(args, "night_rows", None)
        self.start_rows = len(self._ledger()) if night_rows is None else night_rows
        self.report_proc = None              # the `analyze.py report` in progress (it runs beside the night)
        self.report_of = None                # the ledger state the latest report was started for
        self.on_forward = None               # a night of workers: passes a signal on to each

    # bookkeeping
    def _ledger(self) -> list:
        """The ledger; a corrupt one is reported and the last good reading kept, so the night goes on."""
        try:
            self.rows_seen = self.store.read_ledger()
            if self.store_problem:
                self.status("store readable again")
                self.store_problem = None
        except StoreError as e:
            if str(e) != self.store_problem:
                self.store_problem = str(e)
                self.status(f"store problem: {e}")
        return self.rows_seen

    def new_runs(self) -> list:
        """The ledger rows added since the night started, by every worker."""
        return self._ledger()[self.start_rows:]

    def own_runs(self, runs: list = None) -> list:
        """This worker's rows among `runs` (default: the night's new rows); all of them for the only agent."""
        runs = self.new_runs() if runs is None else runs
        return runs if self.worker is None else [r for r in runs if worker_of(r) == self.worker]

    def redact(self, text: str) -> str:
        return text.replace(self.secret, "[redacted]") if self.secret else text

    def write_log(self, text: str):
        text = self.redact(text)  # the key never reaches a file
        self.log.write(text if text.endswith("\n") else text + "\n")

    def status(self, state: str):
        runs = self.rows_seen[self.start_rows:]
        who = f"worker {self.worker} | " if self.worker else ""
        line = self.redact(f"{time.strftime('%Y-%m-%d %H:%M:%S')} | {who}{state} | backend {self.args.backend} | "
                           f"{run_counts(self.own_runs(runs))}"
                           + (f" of {len(runs)} in the night" if self.worker else "") + "\n")
        with open(self.store.path(STATUS_LOG), "a") as f:
            f.write(line)
        print(line, end="", flush=True)

    def stop(self, reason: str, failed: bool = False):
        if self.stopping is None:
            self.stopping, self.failed = reason, failed
            self.stop_seen_at = time.time()

    def check(self) -> bool:
        """Kill overdue training runs; True once a stop rule, the deadline or a signal says stop."""
        for pid, age in training_processes(self.repo):
            if age > self.args.train_timeout:
                self.write_log(f"killing train.py (pid {pid}): running {age:.0f} s > limit {self.args.train_timeout:.0f} s")
                self.status(f"killed a training run after {age:.0f} s (over --train-timeout)")
                end_processes([pid])
        if self.stopping is None:
            runs = self.new_runs()
            reason = stop_reason(runs, self.rules, time.time(), self.started, self.own_runs(runs))
            if reason:
                self.stop(reason)
        self.refresh_report()
        return self.stopping is not None

    def refresh_report(self, wait: bool = False):
        """Rewrite report.html when the ledger changed (a new row, a keep or a discard) since the last report:
        `analyze.py report` in a process beside the night, never waited for (except at the end, `wait`). Its
        failure is one status line; the night goes on. A worker leaves it to its night."""
        if self.worker:
            return
        if self.report_proc is not None:
            if wait:
                try:
                    self.report_proc.wait(timeout=REPORT_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.report_proc.kill()
                    self.report_proc.wait()
            if self.report_proc.poll() is None:
                return
            _, err = self.report_proc.communicate()
            if self.report_proc.returncode != 0:
                self.status(f"report not written: {(err.strip().splitlines() or ['exit code %d' % self.report_proc.returncode])[-1]}")
            self.report_proc = None
        state = [(r.get("run_id"), r.get("status")) for r in self.rows_seen]
        if state == self.report_of or not state:
            return
        self.report_of = state
        self.report_proc = subprocess.Popen([sys.executable, "analyze.py", "report"], cwd=self.repo, text=True,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                            env=agent_environment(self.args.pass_env))
        if wait:
            self.refresh_report(wait=True)

    def should_end_agent(self) -> bool:
        """Once stopping: at once on a signal, else when the experiment in progress is over or its grace is up."""
        if not self.check():
            return False
        if self.immediate:
            return True
        open_reason = self.experiment_open()
        if open_reason is None:
            return True
        if time.time() - self.stop_seen_at >= self.args.stop_grace:
            self.status(f"stop grace of {self.args.stop_grace:.0f} s used up while {open_reason}; ending the agent")
            return True
        return False

    def experiment_open(self):
        """Why the experiment in progress is not finished (a run training or awaiting keep/discard), or None."""
        runs = self.own_runs()  # read first: an analyze.py that wrote what this reads is gone by the check below
        if training_processes(self.repo, "train.py", "launch.py"):
            return "a training run is in progress"
        if training_processes(self.repo, "analyze.py"):
            return "analyze.py is writing the ledger and git"  # e.g. a discard between its ledger and its commit
        if runs and runs[-1].get("status") in ("pending", "rerun"):
            return f"run {runs[-1]['run_id']} awaits keep or discard"
        return None

    def on_signal(self, signum, frame):
        self.immediate = True
        self.stop(CTRL_C if signum == signal.SIGINT else f"{SIGNALLED} ({signal.Signals(signum).name})")
        if self.on_forward:  # a night of workers: each stops at once and settles its own last run
            self.on_forward(signum)
        if self.current is not None and self.current.poll() is None:  # a tool command (its own session)
            try:
                os.killpg(self.current.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass  # it just ended

    # start and end
    def running_night(self):
        """The pid of another supervisor that is running in this repository now, or None."""
        pid_file = self.store.path(worker_file(PID_FILE, self.worker))
        try:
            pid = int(pid_file.read_text().split()[0])
            args = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return None  # no pid file, or its night is over
        return pid if pid != os.getpid() and _alive(pid) and b"supervise.py" in args else None

    def end_leftovers(self):
        """End what a night that died without cleaning up (SIGKILL, the OOM killer) left running here (and, in
        the repository, in its workers' worktrees)."""
        pid_file = self.store.path(worker_file(PID_FILE, self.worker))
        previous = pid_file.read_text().strip() if pid_file.exists() else None
        repo = str(self.repo.resolve())
        left = set()
        for pid in night_processes(""):
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if cwd == repo or cwd.startswith(repo + os.sep):
                left.add(pid)
        if left:
            killed = end_processes(left)
            self.status(f"ended {len(left)} process(es) an earlier night left running (pid file: {previous}); "
                        f"{len(killed)} needed SIGKILL")
        pid_file.write_text(f"{os.getpid()} {self.night}\n")

    def settle(self):
        """After the agent is gone: decide the latest run as its verdict says (keep, or discard and revert
        train.py to the best), so that the night ends with git, train.py and the ledger in agreement."""
        try:
            ledger = self.store.read_ledger()
        except StoreError as e:
            self.status(f"cannot settle the last run: {e}")
            return
        own = self.own_runs(ledger)
        if not own:
            return
        last = own[-1]
        if last.get("status") == "pending" and last.get("verdict") == "keep":
            self._analyze("keep", last["run_id"])
            return
        best = verdict.revert_target(ledger, last)
        if best is None:
            return
        snapshot = self.store.run_path(best[1][0]["run_id"]) / "train.py"
        working = self.repo / "train.py"
        not_best = snapshot.exists() and working.exists() and working.read_text() != snapshot.read_text()
        if last.get("status") in ("pending", "rerun") or (not_best and last.get("status") != "keep"):
            self._analyze("discard", last["run_id"])
        elif not_best:
            self.status(f"train.py is not the best's ({best[1][0]['run_id']}) after kept run {last['run_id']}: "
                        f"left as it is")

    def _analyze(self, command: str, run_id: str):
        proc = subprocess.run([sys.executable, "analyze.py", command, run_id], cwd=self.repo, capture_output=True,
                              text=True, env=agent_environment(self.args.pass_env), timeout=600)
        self.write_log(f"[settle] analyze.py {command} -> exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
        self.status(f"settled the last run: analyze.py {command} "
                    + ("done" if proc.returncode == 0 else f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"))

    def finish(self, settle: bool = True) -> int:
        """End every process of the night, settle the last run (a night of workers leaves that to each
        worker, `settle`), say why the night ended."""
        left = night_processes(self.night) | {pid for pid, _ in training_processes(self.repo)}
        if left:
            killed = end_processes(left)
            self.write_log(f"ended {len(left)} process(es) of the night at the stop ({len(killed)} by SIGKILL)")
        if settle:
            self.settle()
        self._ledger()
        self.refresh_report(wait=True)  # the settled night, for the morning
        self.status(f"stopped: {self.stopping}")
        self.write_log(f"=== stopped: {self.stopping}")
        self.store.path(worker_file(PID_FILE, self.worker)).unlink(missing_ok=True)
        if self.stopping == CTRL_C:
            return 130
        return 1 if self.failed or (self.stopping or "").startswith(SIGNALLED) else 0


# ---------------------------------------------------------------------------
# Several workers: one agent per GPU (--gpus) or per Slurm job slot (--workers), one store, one best
# ---------------------------------------------------------------------------

WORKTREES = ".worktrees"             # the workers' git worktrees, in the repository (gitignored)
WORKER_OPTIONS = ("--gpus", "--workers", "--tag")  # the night's; a worker gets every other option as given
BASELINE_SEED = 42                   # train.py's default SEED: worker K runs its baseline under 42 + K, so they pool


def worker_names(args) -> list:
    """[(name, CUDA_VISIBLE_DEVICES or None)] of the night's workers; [] for a night with one agent."""
    if args.gpus is not None:
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
        if not gpus or len(set(gpus)) != len(gpus) or not all(g.isdigit() for g in gpus):
            raise SystemExit(f"error: --gpus {args.gpus!r} is not a list of distinct GPU indices, e.g. --gpus 0,1,2,3")
        return [(f"gpu{g}", g) for g in gpus]
    if args.workers is not None:
        if args.workers < 1:
            raise SystemExit(f"error: --workers {args.workers} is not a positive number of workers")
        return [(f"w{i}", None) for i in range(args.workers)] if args.workers > 1 else []
    return []


def worker_argv(argv: list) -> list:
    """The command line a worker gets: the night's, without the options that make it a night of workers."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in WORKER_OPTIONS:
            skip = True
        elif not any(arg.startswith(f"{o}=") for o in WORKER_OPTIONS):
            out.append(arg)
    return out


class Workers:
    """A night of several workers. Each gets a git worktree of the repository (.worktrees/<name>, branch
    autoresearch/<tag>-<name>) whose .auto-log-research is the repository's store, so every run, keep and
    claim of every worker is in one ledger under one lock, and `discard` or `sync` in any worktree restores
    the one best. Each worker is a supervise.py of its own in its worktree (`--worker`), with its GPU as
    CUDA_VISIBLE_DEVICES; this process starts them, passes signals on, rewrites the morning report, releases
    the idea claims of a worker that ended, and removes the worktrees at the end (their branches stay)."""

    def __init__(self, sup: Supervisor, names: list, argv: list):
        self.sup, self.names, self.argv = sup, names, argv
        self.repo = sup.repo.resolve()
        self.procs = {}                      # name -> Popen
        self.ended = {}                      # name -> exit code

    def worktree(self, name: str) -> Path:
        return self.repo / WORKTREES / name

    def branch(self, name: str) -> str:
        return f"autoresearch/{self.sup.args.tag}-{name}"

    def prepare(self):
        """Create (or reuse, for a night resumed with the same --tag) each worker's branch and worktree."""
        registered = gitops.git("worktree", "list", "--porcelain", cwd=self.repo)
        changed = gitops.changed_paths(self.repo)
        if changed:
            self.sup.status(f"note: the workers start from the last commit; the uncommitted changes here "
                            f"({', '.join(changed[:3])}) are not in their worktrees")
        for name, _ in self.names:
            path, branch = self.worktree(name), self.branch(name)
            if f"worktree {path}\n" in registered + "\n":
                pass  # a resumed night: the worktree is still there
            elif gitops.git("branch", "--list", branch, cwd=self.repo).strip():
                gitops.git("worktree", "add", "--quiet", str(path), branch, cwd=self.repo)
            else:
                gitops.git("worktree", "add", "--quiet", "-b", branch, str(path), "HEAD", cwd=self.repo)
            link = path / STORE_DIR
            if link.exists() and not link.is_symlink():
                raise StoreError(f"{link} is a folder of its own, not the link to the night's store "
                                 f"{self.sup.store.dir.resolve()}: move it away, then start the night again")
            if not link.is_symlink():
                link.symlink_to(self.sup.store.dir.resolve(), target_is_directory=True)

    def start(self):
        sup = self.sup
        venv = self.repo / ".venv"
        for index, (name, gpu) in enumerate(self.names):
            env = {**os.environ, WORKER_ENV: name, "AUTORESEARCH_WORKER_INDEX": str(index), NIGHT_ENV: sup.night,
                   "AUTORESEARCH_WORKER_SEED": str(BASELINE_SEED + index)}  # its baseline run's SEED (program.md)
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            if venv.is_dir() and "UV_PROJECT_ENVIRONMENT" not in env:
                env["UV_PROJECT_ENVIRONMENT"] = str(venv)  # one environment for all: `uv run` in a worktree uses it
            argv = [*self.argv, "--worker", name, "--night", sup.night, "--night-rows", str(sup.start_rows)]
            pass_fds = ()
            if sup.secret:
                read_end = key_pipe(sup.secret)
                argv += [KEY_FD_FLAG, str(read_end)]
                pass_fds = (read_end,)
            self.procs[name] = subprocess.Popen([sys.executable, str(self.repo / "supervise.py"), *argv],
                                                cwd=self.worktree(name), env=env, pass_fds=pass_fds)
            for fd in pass_fds:
                os.close(fd)
            sup.status(f"worker {name} started (pid {self.procs[name].pid}, {self.branch(name)}"
                       + (f", CUDA_VISIBLE_DEVICES={gpu}" if gpu is not None else "") + ")")

    def forward(self, signum):
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass  # it just ended

    def reap(self):
        """Note the workers that ended; release the ideas they had claimed."""
        for name, proc in self.procs.items():
            if name in self.ended or proc.poll() is None:
                continue
            self.ended[name] = proc.returncode
            with self.sup.store.lock():
                updated, released = claims.release_worker(claims.read(self.sup.store), name)
                if released:
                    claims.write(self.sup.store, updated)
            self.sup.status(f"worker {name} ended (exit code {proc.returncode})"
                            + (f"; released its claim on {released} idea(s)" if released else ""))

    def remove_worktrees(self):
        """Remove every worktree with nothing uncommitted (run files are ignored, and archived); keep the
        others and say why. The branches stay: they are the night's history."""
        for name, _ in self.names:
            path = self.worktree(name)
            if not path.exists():
                continue
            (path / STORE_DIR).unlink(missing_ok=True)
            left = gitops.git("status", "--porcelain", cwd=path).splitlines()
            if left:
                (path / STORE_DIR).symlink_to(self.sup.store.dir.resolve(), target_is_directory=True)
                self.sup.status(f"kept worktree {path}: it has uncommitted files ({', '.join(l[3:] for l in left[:3])})")
                continue
            gitops.git("worktree", "remove", str(path), cwd=self.repo)
        gitops.git("worktree", "prune", cwd=self.repo)

    def summary(self) -> str:
        runs = self.sup.new_runs()
        return "; ".join(f"{name} {run_counts([r for r in runs if worker_of(r) == name])}" for name, _ in self.names)


def run_workers(sup: Supervisor, names: list, argv: list) -> int:
    night = Workers(sup, names, argv)
    try:
        night.prepare()
    except StoreError as e:
        sup.stop(f"cannot create the workers' worktrees: {e}", failed=True)
        print(f"error: {sup.stopping}", file=sys.stderr)
        return sup.finish(settle=False)
    sup.on_forward = night.forward
    night.start()
    while len(night.ended) < len(night.procs):
        night.reap()
        sup._ledger()
        sup.refresh_report()  # after every change of the ledger; the stop rules are each worker's to apply
        time.sleep(POLL_S)
    night.reap()
    sup.status(f"all {len(names)} workers ended: {night.summary()}")
    night.remove_worktrees()
    if sup.stopping is None:
        sup.stop("every worker stopped", failed=any(code not in (0, 130) for code in night.ended.values()))
    code = sup.finish(settle=False)
    return code if code else (1 if any(c not in (0, 130) for c in night.ended.values()) else 0)


# ---------------------------------------------------------------------------
# Backend: claude (the user's Claude Code, restarted whenever it exits)
# ---------------------------------------------------------------------------

def worker_preamble(sup) -> str:
    """What a worker's agent is told before program.md (nothing for the only agent of a night)."""
    if not sup.worker:
        return ""
    branch = gitops.git("branch", "--show-current", cwd=sup.repo).strip()
    return (f"You are worker {sup.worker} of a night with several workers (${WORKER_ENV}={sup.worker}). Your "
            f"branch {branch} is checked out in this worktree; {STORE_DIR}/ is shared with the other workers. "
            f"Follow program.md's section 'Several workers'.\n\n")


def root_refusal(command: list, env: dict):
    """Claude Code refuses --dangerously-skip-permissions as root unless IS_SANDBOX is set: say so before starting."""
    if os.geteuid() == 0 and "--dangerously-skip-permissions" in command and not env.get("IS_SANDBOX"):
        return ROOT_REFUSAL
    return None


def claude_environment(sup) -> dict:
    """The CLI's environment: the allowlist and its own settings, and a Bash tool timeout above the longest
    training run (the CLI's default, 2 minutes, would cut every run and blame the idea's code)."""
    env = agent_environment(sup.args.pass_env, client=True, night=sup.night)
    ms = str(int((sup.args.train_timeout + TOOL_TIMEOUT_MARGIN_S) * 1000))
    env.update(BASH_DEFAULT_TIMEOUT_MS=ms, BASH_MAX_TIMEOUT_MS=ms)
    return env


class SessionLog:
    """Reads the CLI's output (stream-json, or plain text from another command) into supervisor.log as
    one readable line per message, tool call and result, redacted; remembers the last error."""

    def __init__(self, sup, stream):
        self.sup, self.last_error, self.last_line, self.api_retry = sup, None, None, None
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        for raw in stream:
            line = raw.rstrip("\n")
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = None
            if not isinstance(event, dict):
                self.sup.write_log(line)
                self.last_line = line
                if "error" in line.lower():
                    self.last_error = line.strip()
                continue
            for text in self._describe(event):
                self.sup.write_log(text)

    def _describe(self, event: dict) -> list:
        kind = event.get("type")
        if kind == "assistant":
            out = []
            for block in event.get("message", {}).get("content", []):
                if block.get("type") == "text":
                    out.append(f"[assistant] {block.get('text', '')}")
                elif block.get("type") == "tool_use":
                    out.append(f"[tool {block.get('name')}] {json.dumps(block.get('input'))[:LOG_RESULT_CHARS]}")
            return out
        if kind == "user":
            out = []
            for block in event.get("message", {}).get("content", []):
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    content = block.get("content")
                    if isinstance(content, list):
                        content = "\n".join(c.get("text", "") for c in content if isinstance(c, dict))
                    flag = " ERROR" if block.get("is_error") else ""
                    out.append(f"[result{flag}] {str(content)[-LOG_RESULT_CHARS:]}")
            return out
        if kind == "system" and event.get("subtype") == "api_retry":
            self.api_retry = (f"API error {event.get('error_status') or ''} {event.get('error')}, retry "
                              f"{event.get('attempt')} of {event.get('max_retries')}").replace("  ", " ")
            self.last_error = self.api_retry
            return [f"[claude] {self.api_retry}"]
        if kind == "result":
            text = str(event.get("result", ""))
            if event.get("is_error"):
                self.last_error = text.strip() or str(event.get("subtype"))
            self.last_line = text.splitlines()[-1] if text.strip() else self.last_line
            return [f"[claude result {event.get('subtype')}] {text[-LOG_RESULT_CHARS:]}"]
        if kind == "system" and event.get("subtype") == "init":
            return [f"[claude] session {event.get('session_id')} in {event.get('cwd')}, model {event.get('model')}"]
        return []


class KeyHandover:
    """Gives the claude CLI its API key without an environment variable: a key file readable by this user
    only, outside the repository, and an apiKeyHelper (Claude Code's setting) that prints it and deletes
    it. The CLI reads it once at start (its helper TTL is set beyond the night), before the agent can run
    a command, and then holds it in memory only: the agent's commands and train.py never inherit it."""

    TTL_MS = str(7 * 24 * 3600 * 1000)  # never ask the helper again during a session: the file is gone

    def __init__(self, secret: str):
        import tempfile
        self.secret = secret
        self.dir = Path(tempfile.mkdtemp(prefix="alr-key-"))  # 0700
        self.key_file = self.dir / "key"
        self.helper = self.dir / "api-key-helper"
        self.helper.write_text(f"#!/bin/sh\ncat {shlex.quote(str(self.key_file))} 2>/dev/null\n"
                               f"rm -f {shlex.quote(str(self.key_file))}\n")
        self.helper.chmod(0o700)

    def arm(self, command: list, env: dict) -> list:
        """Put the key in place for one session; the command with the helper setting added."""
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.secret)
        env["CLAUDE_CODE_API_KEY_HELPER_TTL_MS"] = self.TTL_MS
        return command + ["--settings", json.dumps({"apiKeyHelper": str(self.helper)})]

    def disarm(self):
        self.key_file.unlink(missing_ok=True)

    def close(self):
        self.disarm()
        self.helper.unlink(missing_ok=True)
        self.dir.rmdir()


def run_claude(sup: Supervisor) -> int:
    command = shlex.split(sup.args.claude_command)
    env = claude_environment(sup)
    refusal = root_refusal(command, env)
    if refusal:
        sup.stop(refusal, failed=True)
        print(f"error: {refusal}", file=sys.stderr)
        return sup.finish()
    handover = KeyHandover(sup.secret) if sup.secret else None
    program = worker_preamble(sup) + (sup.repo / PROGRAM).read_text()
    session, quick_exits, failures, failing_since, delay = 0, 0, 0, None, sup.args.restart_delay
    while not sup.check():
        session += 1
        prompt = program if session == 1 else worker_preamble(sup) + RESUME_PROMPT
        rows_before, t0 = len(sup.new_runs()), time.time()
        sup.status(f"claude session {session} started")
        sup.write_log(f"=== claude session {session} ({' '.join(command)}), {time.strftime('%Y-%m-%d %H:%M:%S')}")
        session_command = handover.arm(command, env) if handover else command
        try:
            proc = subprocess.Popen(session_command, cwd=sup.repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
        except FileNotFoundError:
            sup.stop(f"cannot start {command[0]!r}: not on PATH (install Claude Code, or use --backend api)", failed=True)
            break
        output = SessionLog(sup, proc.stdout)
        try:
            proc.stdin.write(prompt)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it exited before reading: handled below like any exit
        while proc.poll() is None:
            if sup.should_end_agent():
                terminate(proc, night_processes(sup.night))
                break
            time.sleep(POLL_S)
        output.thread.join(timeout=30)
        if handover:
            handover.disarm()  # read by the CLI at its start; gone in any case once the session is
        duration = time.time() - t0
        sup.write_log(f"=== claude session {session} exited with code {proc.returncode} after {duration:.0f} s")
        new_run = len(sup.new_runs()) > rows_before
        if new_run or (proc.returncode == 0 and duration >= QUICK_EXIT_S):
            quick_exits, failures, failing_since, delay = 0, 0, None, sup.args.restart_delay
        elif sup.stopping is None:
            failures += 1
            failing_since = failing_since or t0
            # a quick exit that never reached the API is a bad start (command, login); one that did is an outage
            quick_exits = quick_exits + 1 if duration < QUICK_EXIT_S and not output.api_retry else 0
            error = output.last_error or output.last_line or f"exit code {proc.returncode}"
            what = "API unreachable" if output.api_retry else "agent sessions failing"
            if quick_exits >= MAX_QUICK_EXITS:
                sup.stop(f"claude exited {quick_exits} times in a row within {QUICK_EXIT_S} s without an experiment "
                         f"(last exit code {proc.returncode}): {error}", failed=True)
            elif time.time() - failing_since >= sup.args.max_outage_hours * 3600:
                sup.stop(f"{what} since {hhmm(failing_since)} "
                         f"({failures} sessions without a run): {error}", failed=True)
            else:
                sup.status(f"{what} since {hhmm(failing_since)} "
                           f"({failures} failed sessions); last error: {error}; retrying in {delay:.0f} s")
        if sup.stopping is None:
            if not failures:
                sup.status(f"claude session {session} exited (code {proc.returncode}); restarting")
            _sleep_unless_stopping(sup, delay)
            if failures:
                delay = min(delay * 2, MAX_BACKOFF_S)
    if handover:
        handover.close()
    return sup.finish()


def _sleep_unless_stopping(sup: Supervisor, seconds: float):
    end = time.time() + seconds
    while time.time() < end and not sup.check():
        time.sleep(min(POLL_S, max(0.0, end - time.time())))


# ---------------------------------------------------------------------------
# Backend: api (a built-in agent on the Anthropic Messages API with tool use)
# ---------------------------------------------------------------------------

TOOLS = [
    {"name": "bash", "description": "Run a bash command in the repository root and return its exit code and "
     "the tail of its output. Training (`uv run launch.py > run.log 2>&1`) takes about 5 minutes.",
     "input_schema": {"type": "object", "properties": {
         "command": {"type": "string"},
         "timeout_s": {"type": "integer", "description": f"default {DEFAULT_TOOL_TIMEOUT_S}; training needs ~400"}},
         "required": ["command"]}},
    {"name": "read_file", "description": "Read a text file of the repository.",
     "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}},
    {"name": "write_file", "description": "Create or overwrite a text file of the repository.",
     "input_schema": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                      "required": ["path", "content"]}},
    {"name": "edit_file", "description": "Replace one exact, unique occurrence of `old` by `new` in a file.",
     "input_schema": {"type": "object", "properties": {"path": {"type": "string"}, "old": {"type": "string"},
                                                       "new": {"type": "string"}},
                      "required": ["path", "old", "new"]}},
]


def experiment_prompt(sup: Supervisor) -> str:
    """A fresh, compact context for one experiment: the Current Best, the ideas queue, the last result."""
    parts = ["Do exactly one experiment of the loop in program.md (the system prompt): pick an idea, edit "
             "train.py, commit, train, analyze, read analysis.md, update insights.md and ideas_queue.md, then "
             "follow the verdict (keep, discard, or rerun with another SEED). When the experiment is done, reply "
             "with a short summary and no tool call."]
    for name, label in ((INSIGHTS, "insights.md"), (IDEAS, "ideas_queue.md")):
        path = sup.store.path(name)
        text = path.read_text()[:6000] if path.exists() else "(missing: create it as program.md says)"
        parts.append(f"## {label}\n{text}")
    ledger = sup.store.read_ledger()
    own = sup.own_runs(ledger)
    if own:
        last = own[-1]
        parts.append(f"## The last run\n{last['run_id']}: val_bpb {last.get('val_bpb')}, status {last['status']}, "
                     f"verdict {last.get('verdict')}: {last.get('verdict_reason')} "
                     f"(analysis: {STORE_DIR}/{last['run_id']}/analysis.md)")
    else:
        parts.append("## The last run\nnone yet: do the setup of program.md first (baseline runs).")
    parts.append(f"({len(ledger)} runs in {STORE_DIR}/{RESULTS_TSV})")
    return "\n\n".join(parts)


def _inside(repo: Path, path: str) -> Path:
    target = (repo / path).resolve()
    if repo.resolve() not in (target, *target.parents):
        raise ValueError(f"{path} is outside the repository")
    return target


def run_tool(sup: Supervisor, name: str, args: dict) -> tuple:
    """(text, is_error) of one tool call. The key is removed from the environment commands see."""
    try:
        if name == "bash":
            env = agent_environment(sup.args.pass_env, night=sup.night)  # no key, no other credentials
            timeout = min(float(args.get("timeout_s") or DEFAULT_TOOL_TIMEOUT_S), sup.args.train_timeout)
            proc = subprocess.Popen(["bash", "-c", args["command"]], cwd=sup.repo, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
            sup.current = proc
            try:
                out, _ = proc.communicate(timeout=timeout)
                return f"exit code {proc.returncode}\n{out[-TOOL_OUTPUT_CHARS:]}", proc.returncode != 0
            except subprocess.TimeoutExpired:
                terminate(proc)
                out = proc.stdout.read() if proc.stdout else ""
                return f"killed after {timeout:.0f} s (timeout)\n{out[-TOOL_OUTPUT_CHARS:]}", True
            finally:
                sup.current = None
        if name == "read_file":
            return _inside(sup.repo, args["path"]).read_text()[:50_000], False
        if name == "write_file":
            path = _inside(sup.repo, args["path"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(args["content"])
            return f"wrote {len(args['content'])} characters to {args['path']}", False
        if name == "edit_file":
            path = _inside(sup.repo, args["path"])
            text = path.read_text()
            if text.count(args["old"]) != 1:
                return f"`old` occurs {text.count(args['old'])} times in {args['path']}; it must occur exactly once", True
            path.write_text(text.replace(args["old"], args["new"], 1))
            return f"edited {args['path']}", False
        return f"unknown tool {name}", True
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
        return f"{type(e).__name__}: {e}", True


class ContextTooLong(Exception):
    """The API refused the request as too long (400): trim the conversation and ask again."""


def call_api(sup: Supervisor, client, **request):
    """messages.create, retried by the SDK with backoff, then by waiting out longer outages (up to
    --max-outage-hours). None when the night must stop; errors that no retry can fix (401, 403, 404,
    a bad request) stop the night with the API's own message."""
    import anthropic
    wait, down_since = API_OUTAGE_WAIT_S, None
    while True:
        try:
            response = client.messages.create(**request)
            if down_since:
                sup.status(f"API answering again (down since {hhmm(down_since)})")
            return response
        except (anthropic.APIConnectionError, anthropic.RateLimitError, anthropic.InternalServerError) as e:
            down_since = down_since or time.time()
            since = hhmm(down_since)
            if time.time() - down_since >= sup.args.max_outage_hours * 3600:
                sup.stop(f"API unreachable since {since}: {type(e).__name__}: {e}", failed=True)
                return None
            sup.status(f"API unreachable since {since} ({type(e).__name__}); retrying in {wait:.0f} s")
            _sleep_unless_stopping(sup, wait)
            if sup.stopping:
                return None
            wait = min(wait * 2, MAX_BACKOFF_S)
        except anthropic.BadRequestError as e:
            if "too long" in api_message(e).lower() or "too many tokens" in api_message(e).lower():
                raise ContextTooLong(api_message(e)) from e
            sup.stop(f"the API refused a request ({e.status_code}): {api_message(e)}", failed=True)
            return None
        except (anthropic.AuthenticationError, anthropic.PermissionDeniedError, anthropic.NotFoundError) as e:
            sup.stop(f"the API refused the key or the model ({e.status_code}): {api_message(e)}", failed=True)
            return None


def api_message(e) -> str:
    """The API's own words of an error response ("invalid x-api-key"), not the SDK's wrapping of them."""
    body = getattr(e, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict) and body["error"].get("message"):
        return str(body["error"]["message"])
    return str(getattr(e, "message", e))


def trim_context(messages: list) -> bool:
    """Shorten the oldest long tool results in place; False when nothing is left to shorten."""
    for message in messages[1:-1]:
        if message["role"] != "user" or not isinstance(message["content"], list):
            continue
        for block in message["content"]:
            if block.get("type") == "tool_result" and len(block.get("content", "")) > TRIMMED_RESULT_CHARS:
                block["content"] = "[trimmed: the context grew too long]\n" + block["content"][-TRIMMED_RESULT_CHARS:]
                return True
    return False


def run_api(sup: Supervisor) -> int:
    import anthropic  # lazily: it takes seconds to import, and the claude backend does not need it
    client = anthropic.Anthropic(api_key=sup.secret, max_retries=API_MAX_RETRIES)
    system = worker_preamble(sup) + (sup.repo / PROGRAM).read_text()
    experiment = 0
    while not sup.check():
        experiment += 1
        sup.status(f"api experiment {experiment} started")
        sup.write_log(f"=== api experiment {experiment}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
        messages = [{"role": "user", "content": experiment_prompt(sup)}]
        for _ in range(MAX_TURNS_PER_EXPERIMENT):
            try:
                response = call_api(sup, client, model=sup.args.model, max_tokens=API_MAX_TOKENS, system=system,
                                    tools=TOOLS, messages=messages)
            except ContextTooLong as e:
                if trim_context(messages):
                    sup.write_log(f"context too long ({e}); trimmed the oldest tool result")
                    continue
                sup.status(f"api experiment {experiment} ended: its context is too long even trimmed ({e})")
                break
            if response is None:
                break
            content = [block.model_dump(exclude_none=True) for block in response.content]
            messages.append({"role": "assistant", "content": content})
            for block in content:
                if block["type"] == "text":
                    sup.write_log(f"[assistant] {block['text']}")
            calls = [b for b in content if b["type"] == "tool_use"]
            if not calls or sup.immediate:
                break
            results = []
            for call in calls:
                sup.write_log(f"[tool {call['name']}] {json.dumps(call['input'])[:LOG_RESULT_CHARS]}")
                text, is_error = run_tool(sup, call["name"], call["input"])
                text = sup.redact(text)
                sup.write_log(f"[result{' ERROR' if is_error else ''}] {text[-LOG_RESULT_CHARS:]}")
                results.append({"type": "tool_result", "tool_use_id": call["id"], "content": text,
                                "is_error": is_error})
            messages.append({"role": "user", "content": results})
            if sup.check() and (sup.immediate or time.time() - sup.stop_seen_at >= sup.args.stop_grace):
                break  # any other stop rule lets the agent finish this experiment (keep or discard it) first
        else:
            sup.write_log(f"experiment {experiment} cut off after {MAX_TURNS_PER_EXPERIMENT} turns")
    return sup.finish()


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

KEY_FD_FLAG = "--key-fd"  # internal: the API key arrives on this pipe, never through the environment


def key_pipe(key: str) -> int:
    """The read end of a pipe that holds the key (a key is far smaller than a pipe's buffer), for a process
    started with it as --key-fd."""
    read_end, write_end = os.pipe()
    os.write(write_end, key.encode())
    os.close(write_end)
    return read_end


def handed_over_key(key_fd, argv: list):
    """The API key, kept out of every environment: the first call re-executes the supervisor without
    ANTHROPIC_API_KEY, the key on a pipe (so no process of the agent's can read it, not even from
    /proc/<supervisor>/environ) and does not return; the re-executed one reads it from key_fd."""
    if key_fd is not None:
        with os.fdopen(key_fd) as f:
            return f.read() or None
    key = os.environ.get("ANTHROPIC_API_KEY")
    if not key:
        return None
    read_end = key_pipe(key)
    os.set_inheritable(read_end, True)
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv, KEY_FD_FLAG, str(read_end)], env)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="supervise.py", description=__doc__.split("\n\n")[0].strip(),
                                     allow_abbrev=False)  # worker_argv removes the night's options by their names
    parser.add_argument("--backend", choices=("claude", "api"), required=True)
    parser.add_argument("--hours", type=float, help="stop after this many hours (default: no deadline)")
    parser.add_argument("--max-experiments", type=int, help="stop after this many new runs in the ledger")
    parser.add_argument("--max-crashes", type=int, default=3, help="stop after this many crashed runs in a row")
    parser.add_argument("--max-without-keep", type=int, help="stop after this many runs in a row without a keep")
    parser.add_argument("--max-hours-without-keep", type=float, help="stop after this many hours without a keep")
    parser.add_argument("--max-outage-hours", type=float, default=DEFAULT_MAX_OUTAGE_H,
                        help=f"stop after the API or the agent failed this long (default {DEFAULT_MAX_OUTAGE_H:g})")
    parser.add_argument("--train-timeout", type=float, default=default_train_limit(),
                        help="wall-clock seconds after which a training run is killed (default: 2 x budget + 300)")
    parser.add_argument("--stop-grace", type=float,
                        help="seconds a stop rule waits for the experiment in progress to finish (default: the "
                             f"training limit + {TOOL_TIMEOUT_MARGIN_S})")
    parser.add_argument("--claude-command", default=DEFAULT_CLAUDE_COMMAND,
                        help="the agent command; program.md (then a resume prompt) goes to its stdin")
    parser.add_argument("--pass-env", type=lambda s: {n for n in s.split(",") if n}, default=set(),
                        help="comma-separated names of other environment variables the agent may see (default: none)")
    parser.add_argument("--restart-delay", type=float, default=RESTART_DELAY_S, help="seconds before a restart")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model of the api backend")
    night = parser.add_argument_group("several workers, one store and one best (README: 'An 8-GPU node')")
    night.add_argument("--gpus", help="one worker per GPU, e.g. 0,1,2,3: each in its own git worktree and branch")
    night.add_argument("--workers", type=int, help="this many workers without pinning GPUs (with --launcher slurm)")
    night.add_argument("--tag", default=time.strftime("%b%d").lower(),
                       help="the workers' branches are autoresearch/<tag>-<worker> (default: today, e.g. dec01)")
    slurm_group = parser.add_argument_group("training on Slurm (README: 'A Slurm cluster')")
    slurm_group.add_argument("--launcher", choices=LAUNCHERS, default=None,
                             help="where `uv run launch.py` trains: here (local, the default) or as Slurm jobs")
    slurm_group.add_argument("--partition", help="the Slurm partition of the training jobs")
    slurm_group.add_argument("--gres", help=f"the jobs' generic resources (default {DEFAULT_GRES}; '' for none)")
    slurm_group.add_argument("--slurm-args", help="more sbatch options, e.g. '--account=A --qos=Q'")
    for internal in ("--worker", "--night"):  # set by a night of workers for each of them
        parser.add_argument(internal, help=argparse.SUPPRESS)
    parser.add_argument("--night-rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument(KEY_FD_FLAG, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = worker_names(args)
    if args.stop_grace is None:
        args.stop_grace = args.train_timeout + TOOL_TIMEOUT_MARGIN_S
    repo = Path.cwd()
    if not (repo / PROGRAM).exists() or not (repo / "train.py").exists():
        print(f"error: run supervise.py in the repository root (no {PROGRAM} / train.py in {repo})", file=sys.stderr)
        return 2
    secret = handed_over_key(args.key_fd, argv)  # both backends: the key leaves the environment here
    if args.backend == "api" and not secret:
        print("error: --backend api needs ANTHROPIC_API_KEY in the environment", file=sys.stderr)
        return 2
    os.umask(0o077)  # the logs, the store and what the agent writes: readable by this user only
    launcher_environment(args, os.environ)
    if args.worker:
        os.environ[WORKER_ENV], os.environ[WORKER_PID_ENV] = args.worker, str(os.getpid())  # its commands' claims
    sup = Supervisor(args, repo, secret=secret)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # under nohup, a closed terminal must not end the night
            signal.signal(sig, sup.on_signal)
    other = sup.running_night()
    if other:
        print(f"error: a night is already running in this repository (supervise.py pid {other}); stop it first "
              f"(kill {other}) or run in another clone", file=sys.stderr)
        return 2
    sup.end_leftovers()
    sup.status(f"started (pid {os.getpid()}; stop rules: {describe_rules(sup.rules)}"
               + (f"; {len(names)} workers" if names else "")
               + ("; training on Slurm" if os.environ.get(LAUNCHER_ENV) == "slurm" else "")
               + (f"; morning report: {REPORT})" if not args.worker else ")"))
    if names:
        return run_workers(sup, names, worker_argv(argv))
    return run_claude(sup) if args.backend == "claude" else run_api(sup)


def launcher_environment(args, environ):
    """Where `uv run launch.py` trains, for every process of the night: the launcher options as the
    AUTORESEARCH_ settings launch.py reads (an option not given leaves the environment's value)."""
    for value, name in ((args.launcher, LAUNCHER_ENV), (args.partition, SLURM_ENV["partition"]),
                        (args.gres, SLURM_ENV["gres"]), (args.slurm_args, SLURM_ENV["extra"])):
        if value is not None:
            environ[name] = value


if __name__ == "__main__":
    sys.exit(main())
