"""
An agent CLI's night, whichever CLI it is (night/claude.py, night/codex.py): the CLI restarted
whenever it exits (program.md for the first session, RESUME_PROMPT after), its output read into
supervisor.log one line per message, command and result, its failed sessions counted and backed
off, until a stop rule or its failures end the night.
"""

import json
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable

from harness import proc, settings
from night import rules
from night.supervisor import POLL_S, PROGRAM, Supervisor, worker_preamble

# a session shorter than this without an experiment is a failed start
QUICK_EXIT_S = 60

# ... and this many in a row stop the night (not logged in, bad command, ...)
MAX_QUICK_EXITS = 5

# pause before restarting an agent; doubles after each failed session
RESTART_DELAY_S = 10.0

MAX_BACKOFF_S = 900.0                # ... up to 15 minutes

# failed sessions (API down, 5xx, 401) for this long end the night
DEFAULT_MAX_OUTAGE_H = 1.0

LOG_RESULT_CHARS = 2_000             # the tail of a tool result written to supervisor.log

# the model in a run's agent label when neither the CLI's command nor its settings name one
DEFAULT_MODEL_LABEL = "(its configured model)"

RESUME_PROMPT = (
    "You are resuming an autoresearch session that was interrupted; your earlier context is gone.\n"
    "Read program.md and follow its loop. The state of the research is on disk, not in your "
    "memory:\n"
    "- .auto-log-research/notes/insights.md (the Current Best block and validated findings),\n"
    "- .auto-log-research/notes/ideas_queue.md (prioritised hypotheses),\n"
    "- .auto-log-research/results.tsv (every run so far; `uv run analyze.py status` summarises "
    "it).\n"
    "Check `git status` and `git log -3` first: finish or revert any half-done experiment, then "
    "continue the loop.\n"
    "Never stop to ask; keep experimenting.")


class SessionLog:
    """Reads a CLI's output into supervisor.log as one readable, redacted line per message,
    command and result (describe(), per CLI: its JSON events; plain text lines as they are);
    remembers the last error, the last line, whether the API was being retried and whether the
    model answered at all."""

    def __init__(self, sup, stream):
        self.sup, self.last_error, self.last_line, self.api_retry = sup, None, None, None
        self.answered = False  # the model answered at least once (so the session reached it)
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
            for text in self.describe(event):
                self.sup.write_log(text)

    def describe(self, event: dict) -> list:
        """The log lines of one JSON event of the CLI."""
        raise NotImplementedError


@dataclass(frozen=True)
class AgentCLI:
    """What the loop needs to know of one CLI."""
    name: str                        # "claude", "codex": in the logs and status lines
    log: type                        # its SessionLog
    config_paths: Callable           # env -> what it writes outside the worktree (made writable)
    install_hint: str                # said when its command is not on PATH
    # a session that ends without a new run is a failed one, however long it ran (Codex ends its
    # turn to ask "continue?"); else a long session that exits cleanly is a good one
    run_needed: bool = False


class SessionFailures:
    """The sessions that failed since the last good one (one that ran an experiment, or, where the
    CLI allows it, ran long and exited cleanly): how many, how many quick exits in a row, since
    when, and the pause before the next session, doubled after each failure up to
    MAX_BACKOFF_S."""

    def __init__(self, restart_delay: float, cli: AgentCLI):
        self.restart_delay, self.cli = restart_delay, cli
        self.quick_exits, self.count, self.since, self.delay = 0, 0, None, restart_delay

    def record(self, sup: Supervisor, returncode: int, output: SessionLog, t0: float,
               duration: float, new_run: bool):
        """Count a session that started at t0 and ran `duration` s. Too many quick exits in a row,
        or failures for longer than --max-outage-hours, stop the night; a failure short of that is
        one status line."""
        if new_run or (not self.cli.run_needed and returncode == 0 and duration >= QUICK_EXIT_S):
            self.quick_exits, self.count, self.since, self.delay = 0, 0, None, self.restart_delay
            return
        if sup.stopping is not None:
            return
        self.count += 1
        self.since = self.since or t0
        # a quick exit that never reached the model is a bad start (command, login); one that did
        # is an outage, or an agent that stopped to ask
        reached = output.api_retry or output.answered
        self.quick_exits = self.quick_exits + 1 if duration < QUICK_EXIT_S and not reached else 0
        error = output.last_error or output.last_line or f"exit code {returncode}"
        name = self.cli.name
        what = ("API unreachable" if output.api_retry else
                f"{name} stopping without an experiment" if output.answered and returncode == 0
                else "agent sessions failing")
        if self.quick_exits >= MAX_QUICK_EXITS:
            sup.stop(f"{name} exited {self.quick_exits} times in a row within {QUICK_EXIT_S} s "
                     f"without an experiment (last exit code {returncode}): {error}", failed=True)
        elif time.time() - self.since >= sup.args.max_outage_hours * 3600:
            sup.stop(f"{what} since {rules.hhmm(self.since)} "
                     f"({self.count} sessions without a run): {error}", failed=True)
        else:
            sup.status(f"{what} since {rules.hhmm(self.since)} "
                       f"({self.count} failed sessions); last error: {error}; retrying in "
                       f"{self.delay:.0f} s")

    def pause(self, sup: Supervisor):
        """Wait before the next session; while sessions fail, each wait is twice the last."""
        sup.sleep(self.delay)
        if self.count:
            self.delay = min(self.delay * 2, MAX_BACKOFF_S)


def run_session(sup: Supervisor, cli: AgentCLI, session: int, command: list, env: dict, proxy,
                prompt: str):
    """Start session number `session` of the CLI, hand it `prompt` and log its output until it
    exits or the agent must end. (the process, its SessionLog); None when the command cannot be
    started (the night is stopped then)."""
    sup.status(f"{cli.name} session {session} started")
    sup.write_log(f"=== {cli.name} session {session} ({' '.join(command)}), "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    session_command = sup.boxed(command, writable=cli.config_paths(env),
                                relay=proxy.socket if proxy else None)
    try:
        child = subprocess.Popen(session_command, cwd=sup.repo, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True, env=env)
    except FileNotFoundError:
        sup.stop(f"cannot start {command[0]!r}: not on PATH ({cli.install_hint}, or use "
                 f"--backend api)", failed=True)
        return None
    output = cli.log(sup, child.stdout)
    try:
        child.stdin.write(prompt)
        child.stdin.close()
    except BrokenPipeError:
        pass  # it exited before reading: handled like any exit
    while child.poll() is None:
        if sup.should_end_agent():
            sup.end_agent(child, proc.marked(settings.NIGHT_ENV, sup.night))
            break
        time.sleep(POLL_S)
    output.thread.join(timeout=30)
    return child, output


def cli_night(sup: Supervisor, cli: AgentCLI, command: list, env: dict, proxy) -> int:
    """The sessions of the night, until it stops; the exit code of the supervisor."""
    program = worker_preamble(sup) + (sup.repo / PROGRAM).read_text()
    session, failures = 0, SessionFailures(sup.args.restart_delay, cli)
    while not sup.check():
        session += 1
        prompt = program if session == 1 else worker_preamble(sup) + RESUME_PROMPT
        rows_before, t0 = len(sup.new_runs()), time.time()
        ended = run_session(sup, cli, session, command, env, proxy, prompt)
        if ended is None:
            break
        child, output = ended
        duration = time.time() - t0
        sup.write_log(f"=== {cli.name} session {session} exited with code {child.returncode} "
                      f"after {duration:.0f} s")
        failures.record(sup, child.returncode, output, t0, duration,
                        new_run=len(sup.new_runs()) > rows_before)
        if sup.stopping is None:
            if not failures.count:
                sup.status(f"{cli.name} session {session} exited (code {child.returncode}); "
                           f"restarting")
            failures.pause(sup)
    return sup.finish()
