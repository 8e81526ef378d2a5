"""
One agent's night in one checkout: the stop rules applied, overdue training runs killed, the
morning report rewritten, every process of the night ended at the stop, and the last run settled
(as analysis/bookkeeping.py decides) so that git, train.py and the ledger agree however the night
ends.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from harness import box, contract, git, proc, settings
from harness.fixed import TAMPERING_FILE
from harness.contract import HarnessError
from analysis import bookkeeping, verdict
from analysis.store import NIGHT_FILE, REPORT_HTML, STORE_DIR, Store, worker_of
from night import confirm, rules, sandbox
from night.runs import RunService
from night.watch import FixedWatch
from night.environment import harness_command, harness_environment

PROGRAM = "program.md"
STATUS_LOG = "status.log"          # one line per event, in the store: `tail -f` it
SUPERVISOR_LOG = "supervisor.log"  # every agent session's output and every tool call
# the running night, so the next start finds what a killed one left
PID_FILE = "supervisor.pid"
POLL_S = 2.0                       # how often stop rules and training runs are checked
# the morning report, rewritten after every change of the ledger
REPORT = f"{STORE_DIR}/{REPORT_HTML}"
# `analyze.py report` takes ~1 s for 500 runs; this only ends a hang
REPORT_TIMEOUT_S = 120
SETTLE_TIMEOUT_S = 600             # `analyze.py keep/discard` at the stop; this only ends a hang
CTRL_C = "stopped by Ctrl-C"
SIGNALLED = "stopped by a signal"


def worker_file(name: str, worker) -> str:
    """A night file of one worker (supervisor-gpu0.log) beside the night's own (supervisor.log)."""
    if not worker:
        return name
    stem, dot, ext = name.partition(".")
    return f"{stem}-{worker}{dot}{ext}"


class Supervisor:
    """One agent's night in one checkout: the whole night with one GPU, or one worker (`--worker`,
    started by a night of workers in its worktree) of a night with several."""

    def __init__(self, args, repo: Path, secret: str = None):
        self.args, self.repo = args, repo
        self.worker = getattr(args, "worker", None)  # None: the only agent of the night
        self.store = Store(repo)
        self.store.dir.mkdir(mode=0o700, exist_ok=True)
        deadline = time.time() + args.hours * 3600 if args.hours else None
        self.confirm_minutes, self.confirm_note = confirm.stretch_minutes(
            args.hours, getattr(args, "confirm_minutes", None),
            bool(getattr(args, "gpus", None) or getattr(args, "workers", None) or self.worker))
        self.rules = rules.StopRules(
            deadline=deadline,
            confirm_from=(deadline - self.confirm_minutes * 60 if self.confirm_minutes
                          else None),
            max_experiments=args.max_experiments, max_consecutive_crashes=args.max_crashes,
            max_without_keep=args.max_without_keep,
            max_hours_without_keep=args.max_hours_without_keep)
        self.started = time.time()
        # the marker every process of this night carries; a worker's extends its night's, so the
        # night's prefix finds every process of every worker
        self.night = getattr(args, "night", None) or f"{os.getpid()}-{int(self.started)}"
        if self.worker:
            self.night = f"{self.night}-{self.worker}"
        self.stopping = None         # the reason, once the night is over
        self.stop_seen_at = None     # when a stop rule first fired: the grace runs from here
        self.immediate = False       # a signal: stop now, no grace for the experiment in progress
        self.failed = False          # the night itself failed (cannot start, outage): exit non-zero
        self.store_problem = None
        self.log = open(self.store.path(worker_file(SUPERVISOR_LOG, self.worker)), "a", buffering=1)
        self.secret = secret
        self.current = None          # the running tool command of the api backend
        self.rows_seen = []
        night_rows = getattr(args, "night_rows", None)
        self.start_rows = len(self._ledger()) if night_rows is None else night_rows
        # the `analyze.py report` in progress (it runs beside the night)
        self.report_proc = None
        self.report_of = None        # the ledger state the latest report was started for
        self.on_forward = None       # a night of workers: passes a signal on to each
        self.watch = None            # the fixed files' hashes at the night's start (begin)
        self.tampered = []           # what differed from them: the night stopped on it
        self.unboxed = None          # why the agent runs outside its box (None: boxed; begin)
        self.runs = None             # the night's runner of the agent's training runs (begin)
        self.isolated = False        # the box has no network but the key proxy (begin)
        # "<backend> <model>" of the agent's sessions, set by its backend: the ledger's rows
        # record it (AUTORESEARCH_AGENT)
        self.agent = None
        self.life = None             # a worker's life file, held open (supervise.py)

    # -- the ledger and the logs -----------------------------------------------------------------

    def _ledger(self) -> list:
        """The ledger; a corrupt one is reported and the last good reading kept: the night goes
        on."""
        try:
            self.rows_seen = self.store.read_ledger()
            if self.store_problem:
                self.status("store readable again")
                self.store_problem = None
        except HarnessError as e:
            if str(e) != self.store_problem:
                self.store_problem = str(e)
                self.status(f"store problem: {e}")
        return self.rows_seen

    def new_runs(self) -> list:
        """The ledger rows added since the night started, by every worker."""
        return self._ledger()[self.start_rows:]

    def own_runs(self, runs: list = None) -> list:
        """This worker's rows among `runs` (default: the night's new rows); all for the only
        agent."""
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
        line = self.redact(f"{time.strftime('%Y-%m-%d %H:%M:%S')} | {who}{state} | backend "
                           f"{self.args.backend} | {rules.run_counts(self.own_runs(runs))}"
                           + (f" of {len(runs)} in the night" if self.worker else "") + "\n")
        with open(self.store.path(STATUS_LOG), "a") as f:
            f.write(line)
        print(line, end="", flush=True)

    # -- the stop rules --------------------------------------------------------------------------

    def stop(self, reason: str, failed: bool = False):
        if self.stopping is None:
            self.stopping, self.failed = reason, failed
            self.stop_seen_at = time.time()

    def check_fixed(self):
        """Stop the night at once, loudly, when a fixed file or a startup hook of the environment
        differs from the night's start (night/watch.py); kept in the store for the morning."""
        if self.watch is None or self.tampered:
            return
        found = self.watch.changes()
        if not found:
            return
        self.tampered = found
        with open(self.store.path(TAMPERING_FILE), "a") as f:
            f.writelines(f"{contract.stamp()} | TAMPERING: {line}\n" for line in found)
        for line in found:
            self.status(f"TAMPERING: {line}")
        self.immediate = True
        self.stop(f"TAMPERING: {found[0]}", failed=True)

    def check(self) -> bool:
        """Kill overdue training runs, compare the fixed files with the night's start; True once a
        stop rule, the deadline, a changed fixed file or a signal says stop."""
        self.check_fixed()
        for pid, age in proc.scripts_in(self.repo, contract.TRAIN_PY):
            if age > self.args.train_timeout:
                self.write_log(f"killing train.py (pid {pid}): running {age:.0f} s > limit "
                               f"{self.args.train_timeout:.0f} s")
                self.status(f"killed a training run after {age:.0f} s (over --train-timeout)")
                proc.end_processes([pid])
        if self.stopping is None:
            runs = self.new_runs()
            reason = rules.stop_reason(runs, self.rules, time.time(), self.started,
                                       self.own_runs(runs))
            if reason:
                self.stop(reason)
        self.refresh_report()
        return self.stopping is not None

    def sleep(self, seconds: float):
        """Wait, checking the stop rules, until `seconds` passed or the night stops."""
        end = time.time() + seconds
        while time.time() < end and not self.check():
            time.sleep(min(POLL_S, max(0.0, end - time.time())))

    def refresh_report(self, wait: bool = False):
        """Rewrite report.html when the ledger changed (a new row, a keep or a discard) since the
        last report: `analyze.py report` in a process beside the night, never waited for (except at
        the end, `wait`). Its failure is one status line; the night goes on. A worker leaves it to
        its night."""
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
                why = err.strip().splitlines() or [f"exit code {self.report_proc.returncode}"]
                self.status(f"report not written: {why[-1]}")
            self.report_proc = None
        rows = [(r.get("run_id"), r.get("status")) for r in self.rows_seen]
        state = (rows, len(self.tampered))  # a tampering found is shown too
        if state == self.report_of or not rows:
            return
        self.report_of = state
        self.report_proc = subprocess.Popen(harness_command("analyze.py", "report"), cwd=self.repo,
                                            text=True, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE,
                                            env=harness_environment(
                                                self.args.pass_env))
        if wait:
            self.refresh_report(wait=True)

    def should_end_agent(self) -> bool:
        """Once stopping: at once on a signal, else when the experiment in progress is over or its
        grace is up."""
        if not self.check():
            return False
        if self.immediate:
            return True
        open_reason = self.experiment_open()
        if open_reason is None:
            return True
        if time.time() - self.stop_seen_at >= self.args.stop_grace:
            self.status(f"stop grace of {self.args.stop_grace:.0f} s used up while {open_reason}; "
                        f"ending the agent")
            return True
        return False

    def experiment_open(self):
        """Why the experiment in progress is not finished (a run training or awaiting keep or
        discard), or None."""
        runs = self.own_runs()  # read first: an analyze.py that wrote it is gone by the check below
        if proc.scripts_in(self.repo, contract.TRAIN_PY, "launch.py"):
            return "a training run is in progress"
        if proc.scripts_in(self.repo, "analyze.py"):
            return "analyze.py is writing the ledger and git"  # a discard between ledger and commit
        if runs and runs[-1].get("status") in bookkeeping.UNDECIDED:
            return f"run {runs[-1]['run_id']} awaits keep or discard"
        return None

    def on_signal(self, signum, frame):
        self.immediate = True
        self.stop(CTRL_C if signum == signal.SIGINT
                  else f"{SIGNALLED} ({signal.Signals(signum).name})")
        if self.on_forward:  # a night of workers: each stops at once and settles its own last run
            self.on_forward(signum)
        if self.current is not None and self.current.poll() is None:  # a tool command's session
            if not self.unboxed:
                box.signal_stop(self.current.pid)
                return
            try:
                os.killpg(self.current.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass  # it just ended

    # -- the start and the end -------------------------------------------------------------------

    def running_night(self):
        """The pid of another supervisor that is running in this repository now, or None."""
        try:
            pid = int(self.store.path(worker_file(PID_FILE, self.worker)).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None  # no pid file, or its night is over
        return pid if pid != os.getpid() and proc.runs_script(pid, "supervise.py") else None

    def begin(self):
        """End what a night that died without cleaning up (SIGKILL, the OOM killer) left running
        here (and, in the repository, in its workers' worktrees); then claim the repository for
        this night, and (the night's own supervisor) fix its keep policy for analyze.py."""
        pid_file = self.store.path(worker_file(PID_FILE, self.worker))
        previous = pid_file.read_text().strip() if pid_file.exists() else None
        repo = self.repo.resolve()
        left = {pid for pid in proc.marked(settings.NIGHT_ENV, "")
                if (cwd := proc.cwd_of(pid)) is not None and (cwd == repo or repo in cwd.parents)}
        if left:
            killed = proc.end_processes(left)
            self.status(f"ended {len(left)} process(es) an earlier night left running (pid file: "
                        f"{previous}); {len(killed)} needed SIGKILL")
        pid_file.write_text(f"{os.getpid()} {self.night}\n")
        self.watch = FixedWatch(self.repo)  # before the agent runs anything
        self.unboxed = sandbox.NOT_WANTED if self.args.no_sandbox else box.unavailable()
        # a claude CLI without a key uses its own login, which needs the network
        self.isolated = not self.unboxed and (self.args.backend == "api" or bool(self.secret))
        if not self.unboxed and not (self.args.gpus or self.args.workers):  # one agent: its runner
            self.runs = RunService(self)
            # for the agent's launch.py and analyze.py (not the night's own: harness_environment)
            os.environ[settings.RUN_SOCKET_ENV] = str(self.runs.socket)
        if not self.worker:  # said once for the night (the start line), not by each worker again
            sandbox.record(self.store, self.unboxed, self.isolated)
            policy = settings.VERDICT or verdict.VERDICT_MODE
            contract.atomic_write(self.store.path(NIGHT_FILE), json.dumps(
                {"pid": os.getpid(), "verdict": policy, "started_at": contract.stamp()}) + "\n")

    def boxed(self, command: list, writable=(), relay=None) -> list:
        """`command` as the agent's process runs it: in its box (night/sandbox.py), unless the
        night runs unboxed; `relay`: the key proxy's socket, the box's way to the API."""
        if self.unboxed:
            return command
        return sandbox.box(command, self.repo, writable=writable, isolated=self.isolated,
                           relay=relay, runner=self.runs.folder if self.runs else None)

    def end_agent(self, child, also=()):
        """End the agent's process `child` (the CLI, a tool command) and everything below it;
        unboxed, also the processes `also` (what the agent started in sessions of their own)."""
        if self.unboxed:
            proc.terminate(child, also)
        else:
            box.end(child)

    def archive_interrupted(self):
        """A run the stop cut before the agent analysed it (Ctrl-C while it trained: train.py wrote
        its crash summary): archive it, so that the ledger has it and settling reverts its
        experiment."""
        try:
            summary = json.loads((self.repo / contract.RUN_SUMMARY).read_text())
        except (OSError, ValueError):
            return  # no run here, or one analyze.py would not archive either
        started = summary.get("started_at") if isinstance(summary, dict) else None
        if started is None or any(r.get("started_at") == started for r in self._ledger()):
            return
        # the agent's run, of its night and session, as if the agent had analysed it
        env = harness_environment(self.args.pass_env, night=self.night, agent=self.agent)
        done = subprocess.run(harness_command("analyze.py"), cwd=self.repo, capture_output=True,
                              text=True, env=env, timeout=SETTLE_TIMEOUT_S)
        self.write_log(f"[settle] analyze.py -> exit {done.returncode}\n{done.stdout}{done.stderr}")
        self.status("archived the run the stop interrupted: analyze.py " + (
            "done" if done.returncode == 0
            else f"failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"))
        self._ledger()

    def settle(self):
        """After the agent is gone: archive a run the stop interrupted, then decide the latest run
        as its verdict says (keep, or discard and revert train.py to the best), so that the night
        ends with git, train.py and the ledger in agreement."""
        self.archive_interrupted()
        try:
            command, what = bookkeeping.settle_command(self.store,
                                                       self.worker or settings.MAIN_WORKER,
                                                       self.repo / contract.TRAIN_PY)
        except HarnessError as e:
            self.status(f"cannot settle the last run: {e}")
            return
        if command is None:
            if what:
                self.status(what)
            return
        done = subprocess.run(harness_command("analyze.py", command, what), cwd=self.repo,
                              capture_output=True, text=True,
                              env=harness_environment(self.args.pass_env),
                              timeout=SETTLE_TIMEOUT_S)
        self.write_log(f"[settle] analyze.py {command} -> exit {done.returncode}\n"
                       f"{done.stdout}{done.stderr}")
        self.status(f"settled the last run: analyze.py {command} " + (
            "done" if done.returncode == 0
            else f"failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"))

    def finish(self, settle: bool = True) -> int:
        """End every process of the night, settle the last run (a night of workers leaves that to
        each worker, `settle`), say why the night ended."""
        if self.runs is not None:  # a run in progress ends with its crash summary, sealed
            self.runs.close()
        left = (proc.marked(settings.NIGHT_ENV, self.night)
                | {pid for pid, _ in proc.scripts_in(self.repo, contract.TRAIN_PY)})
        if left:
            killed = proc.end_processes(left)
            self.write_log(f"ended {len(left)} process(es) of the night at the stop ({len(killed)} "
                           f"by SIGKILL)")
        if settle and self.tampered:  # settling runs analyze.py: code the agent may have changed
            self.status("the last run is not settled: fixed files changed during the night "
                        f"(see {STORE_DIR}/{TAMPERING_FILE})")
        elif settle:
            self.settle()
            if (self.stopping or "").startswith(rules.CONFIRM_STRETCH) and not self.immediate:
                self.report_of = None  # the ledger stays as it was: the report is new all the same
                try:
                    confirm.Confirmation(self).run()
                except (HarnessError, OSError, subprocess.TimeoutExpired) as e:
                    self.status(f"confirmation failed, the morning has no confirmed gain: {e}")
        self._ledger()
        self.refresh_report(wait=True)  # the settled night, for the morning
        self.status(f"stopped: {self.stopping}")
        self.write_log(f"=== stopped: {self.stopping}")
        self.store.path(worker_file(PID_FILE, self.worker)).unlink(missing_ok=True)
        if self.life is not None:  # its claims are released; the file is of no use to anyone now
            Path(self.life.name).unlink(missing_ok=True)
        if not self.worker:
            self.store.path(NIGHT_FILE).unlink(missing_ok=True)
        if self.stopping == CTRL_C:
            return 130
        return 1 if self.failed or (self.stopping or "").startswith(SIGNALLED) else 0


def worker_preamble(sup: Supervisor) -> str:
    """What a worker's agent is told before program.md (nothing for the only agent of a night)."""
    if not sup.worker:
        return ""
    branch = git.git("branch", "--show-current", cwd=sup.repo).strip()
    return (f"You are worker {sup.worker} of a night with several workers "
            f"(${settings.WORKER_ENV}={sup.worker}). Your branch {branch} is checked out in this "
            f"worktree; {STORE_DIR}/ is shared with the other workers. Follow program.md's section "
            f"'Several workers'.\n\n")
