"""
The claude backend: your Claude Code CLI (`claude -p`), restarted whenever it exits, its output
read into supervisor.log one line per message, tool call and result; it reaches the API through
the night's key proxy (night/keyproxy.py) with a token of the night, never the key.
"""

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness import box, proc, settings
from night import rules
from night.environment import KEY_ENV, agent_environment
from night.keyproxy import DEFAULT_UPSTREAM, KeyProxy
from night.supervisor import POLL_S, PROGRAM, Supervisor, worker_preamble

# unattended: no permission prompts; stream-json so that every tool call and result reaches the log
DEFAULT_CLAUDE_COMMAND = ("claude -p --dangerously-skip-permissions --output-format stream-json "
                          "--verbose")

# a claude session shorter than this without an experiment is a failed start
QUICK_EXIT_S = 60

# ... and this many in a row stop the night (not logged in, bad command, ...)
MAX_QUICK_EXITS = 5

# pause before restarting an agent; doubles after each failed session
RESTART_DELAY_S = 10.0

MAX_BACKOFF_S = 900.0                # ... up to 15 minutes

# failed sessions (API down, 5xx, 401) for this long end the night
DEFAULT_MAX_OUTAGE_H = 1.0

BASE_URL_ENV = "ANTHROPIC_BASE_URL"  # the CLI's API; the proxy's upstream
# the CLI's other credential; with a key proxy the CLI has none but the night's token
AUTH_TOKEN_ENV = "ANTHROPIC_AUTH_TOKEN"

CLAUDE_STATE_FILE = ".claude.json"  # the CLI's state beside ~/.claude, without $CLAUDE_CONFIG_DIR

LOG_RESULT_CHARS = 2_000             # the tail of a tool result written to supervisor.log

ROOT_REFUSAL = ("running as root: Claude Code refuses --dangerously-skip-permissions as root. Run "
                "the night as a non-root user, or, inside a container or VM you are willing to let "
                "the agent own, set IS_SANDBOX=1 (Claude Code's variable for sandboxed "
                "environments); see README, 'Threat model'")

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


def root_refusal(command: list, env: dict):
    """Claude Code refuses --dangerously-skip-permissions as root unless IS_SANDBOX is set: say so
    before starting."""
    if (os.geteuid() == 0 and "--dangerously-skip-permissions" in command
            and not env.get("IS_SANDBOX")):
        return ROOT_REFUSAL
    return None


def claude_environment(sup, proxy: KeyProxy = None) -> dict:
    """The CLI's environment: the allowlist and its own settings, a Bash tool timeout above the
    longest training run (the CLI's default, 2 minutes, would cut every run and blame the idea's
    code) and, with a key, the key proxy as its API and the night's token as its key."""
    env = agent_environment(sup.args.pass_env, client=True, night=sup.night)
    ms = str(int((sup.args.train_timeout + settings.TOOL_MARGIN_S) * 1000))
    env.update(BASH_DEFAULT_TIMEOUT_MS=ms, BASH_MAX_TIMEOUT_MS=ms)
    if proxy is not None:
        env.pop(AUTH_TOKEN_ENV, None)
        env[KEY_ENV] = proxy.token
        env[BASE_URL_ENV] = box.RELAY_URL if sup.isolated else proxy.url
    return env


class SessionLog:
    """Reads the CLI's output (stream-json, or plain text from another command) into supervisor.log
    as one readable line per message, tool call and result, redacted; remembers the last error."""

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
                    out.append(f"[tool {block.get('name')}] "
                               f"{json.dumps(block.get('input'))[:LOG_RESULT_CHARS]}")
            return out
        if kind == "user":
            out = []
            for block in event.get("message", {}).get("content", []):
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    content = block.get("content")
                    if isinstance(content, list):
                        content = "\n".join(c.get("text", "") for c in content
                                            if isinstance(c, dict))
                    flag = " ERROR" if block.get("is_error") else ""
                    out.append(f"[result{flag}] {str(content)[-LOG_RESULT_CHARS:]}")
            return out
        if kind == "system" and event.get("subtype") == "api_retry":
            self.api_retry = (f"API error {event.get('error_status') or ''} {event.get('error')}, "
                              f"retry {event.get('attempt')} of {event.get('max_retries')}"
                              ).replace("  ", " ")
            self.last_error = self.api_retry
            return [f"[claude] {self.api_retry}"]
        if kind == "result":
            text = str(event.get("result", ""))
            if event.get("is_error"):
                self.last_error = text.strip() or str(event.get("subtype"))
            self.last_line = text.splitlines()[-1] if text.strip() else self.last_line
            return [f"[claude result {event.get('subtype')}] {text[-LOG_RESULT_CHARS:]}"]
        if kind == "system" and event.get("subtype") == "init":
            return [f"[claude] session {event.get('session_id')} in {event.get('cwd')}, "
                    f"model {event.get('model')}"]
        return []


def config_paths(env: dict) -> list:
    """What the CLI writes outside the worktree: its config folder ($CLAUDE_CONFIG_DIR, or
    ~/.claude and ~/.claude.json), made when absent so that it can be bound into the box."""
    if env.get("CLAUDE_CONFIG_DIR"):
        folder = Path(env["CLAUDE_CONFIG_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        return [folder]
    home = Path(env.get("HOME") or Path.home())
    folder, state = home / ".claude", home / CLAUDE_STATE_FILE
    folder.mkdir(exist_ok=True)
    if not state.exists():
        state.write_text("{}\n")  # what the CLI writes itself on its first start
    return [folder, state]


class SessionFailures:
    """The claude sessions that failed since the last good one (one that ran an experiment, or ran
    long and exited cleanly): how many, how many quick exits in a row, since when, and the pause
    before the next session, doubled after each failure up to MAX_BACKOFF_S."""

    def __init__(self, restart_delay: float):
        self.restart_delay = restart_delay
        self.quick_exits, self.count, self.since, self.delay = 0, 0, None, restart_delay

    def record(self, sup: Supervisor, returncode: int, output: SessionLog, t0: float,
               duration: float, new_run: bool):
        """Count a session that started at t0 and ran `duration` s. Too many quick exits in a row,
        or failures for longer than --max-outage-hours, stop the night; a failure short of that is
        one status line."""
        if new_run or (returncode == 0 and duration >= QUICK_EXIT_S):
            self.quick_exits, self.count, self.since, self.delay = 0, 0, None, self.restart_delay
            return
        if sup.stopping is not None:
            return
        self.count += 1
        self.since = self.since or t0
        # a quick exit that never reached the API is a bad start (command, login); one that did is
        # an outage
        self.quick_exits = (self.quick_exits + 1
                            if duration < QUICK_EXIT_S and not output.api_retry else 0)
        error = output.last_error or output.last_line or f"exit code {returncode}"
        what = "API unreachable" if output.api_retry else "agent sessions failing"
        if self.quick_exits >= MAX_QUICK_EXITS:
            sup.stop(f"claude exited {self.quick_exits} times in a row within {QUICK_EXIT_S} s "
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


def run_session(sup: Supervisor, session: int, command: list, env: dict, proxy, prompt: str):
    """Start claude session number `session`, hand it `prompt` and log its output until it exits
    or the agent must end. (the process, its SessionLog); None when the command cannot be started
    (the night is stopped then)."""
    sup.status(f"claude session {session} started")
    sup.write_log(f"=== claude session {session} ({' '.join(command)}), "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    session_command = sup.boxed(command, writable=config_paths(env),
                                relay=proxy.socket if proxy else None)
    try:
        child = subprocess.Popen(session_command, cwd=sup.repo, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True, env=env)
    except FileNotFoundError:
        sup.stop(f"cannot start {command[0]!r}: not on PATH (install Claude Code, or use "
                 f"--backend api)", failed=True)
        return None
    output = SessionLog(sup, child.stdout)
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


def run_claude(sup: Supervisor) -> int:
    """The claude backend: the CLI restarted whenever it exits (program.md for the first session,
    RESUME_PROMPT after), until a stop rule or its failures end the night."""
    command = shlex.split(sup.args.claude_command)
    proxy = (KeyProxy(sup.secret, os.environ.get(BASE_URL_ENV) or DEFAULT_UPSTREAM)
             if sup.secret else None)
    try:
        return claude_night(sup, command, claude_environment(sup, proxy), proxy)
    finally:
        if proxy is not None:
            proxy.close()


def claude_night(sup: Supervisor, command: list, env: dict, proxy) -> int:
    """The sessions of the night, until it stops; the exit code of the supervisor."""
    refusal = root_refusal(command, env)
    if refusal:
        sup.stop(refusal, failed=True)
        print(f"error: {refusal}", file=sys.stderr)
        return sup.finish()
    program = worker_preamble(sup) + (sup.repo / PROGRAM).read_text()
    session, failures = 0, SessionFailures(sup.args.restart_delay)
    while not sup.check():
        session += 1
        prompt = program if session == 1 else worker_preamble(sup) + RESUME_PROMPT
        rows_before, t0 = len(sup.new_runs()), time.time()
        ended = run_session(sup, session, command, env, proxy, prompt)
        if ended is None:
            break
        child, output = ended
        duration = time.time() - t0
        sup.write_log(f"=== claude session {session} exited with code {child.returncode} after "
                      f"{duration:.0f} s")
        failures.record(sup, child.returncode, output, t0, duration,
                        new_run=len(sup.new_runs()) > rows_before)
        if sup.stopping is None:
            if not failures.count:
                sup.status(f"claude session {session} exited (code {child.returncode}); restarting")
            failures.pause(sup)
    return sup.finish()
