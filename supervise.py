"""
The unattended overnight loop: keeps an agent running experiments (program.md) until a deadline, an
experiment budget or a stop rule, and leaves the store and git consistent however it ends.

    uv run supervise.py --backend claude --hours 8     # your Claude Code, `claude -p`, restarted whenever it exits
    uv run supervise.py --backend api --hours 8        # a built-in agent on the Anthropic API (ANTHROPIC_API_KEY)

No state lives only in an agent's context: every restart (claude) or experiment (api) starts fresh
from program.md, insights.md, ideas_queue.md and results.tsv. A training run that exceeds its
wall-clock limit is killed. Ctrl-C stops cleanly. Progress: `tail -f .auto-log-research/status.log`;
each agent session's output is in .auto-log-research/supervisor.log.
"""

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from analysis import verdict
from analysis.store import INSIGHTS, RESULTS_TSV, STORE_DIR, Store, parse_stamp

PROGRAM = "program.md"
IDEAS = "ideas_queue.md"
STATUS_LOG = "status.log"            # one line per event, in the store: `tail -f` it
SUPERVISOR_LOG = "supervisor.log"    # every agent session's output and every tool call
DEFAULT_CLAUDE_COMMAND = "claude -p --dangerously-skip-permissions"  # unattended: no permission prompts
DEFAULT_MODEL = "claude-sonnet-4-5"
QUICK_EXIT_S = 60                    # a claude session shorter than this without an experiment is a failed start
MAX_QUICK_EXITS = 5                  # ... and this many in a row stop the night (not logged in, bad command, ...)
RESTART_DELAY_S = 10.0               # pause before restarting an agent; doubles after each quick exit
POLL_S = 2.0                         # how often stop rules and training runs are checked
KILL_GRACE_S = 15.0                  # SIGTERM first (train.py writes its crash summary), SIGKILL after this
API_MAX_RETRIES = 8                  # the SDK's own retries (429, 5xx, connection) with exponential backoff
API_OUTAGE_WAIT_S = 60.0             # then wait this long (doubling, up to 15 min) and retry, never give up the night
API_MAX_TOKENS = 8192
MAX_TURNS_PER_EXPERIMENT = 60        # tool calls in one api experiment before it is cut off
TOOL_OUTPUT_CHARS = 12_000           # the tail of a command's output returned to the model
DEFAULT_TOOL_TIMEOUT_S = 600         # a shell command's default limit (training has its own, below)
CTRL_C = "stopped by Ctrl-C"
RESUME_PROMPT = """You are resuming an autoresearch session that was interrupted; your earlier context is gone.
Read program.md and follow its loop. The state of the research is on disk, not in your memory:
- .auto-log-research/insights.md (the Current Best block and validated findings),
- .auto-log-research/ideas_queue.md (prioritised hypotheses),
- .auto-log-research/results.tsv (every run so far; `uv run analyze.py status` summarises it).
Check `git status` and `git log -3` first: finish or revert any half-done experiment, then continue the loop.
Never stop to ask; keep experimenting."""


def default_train_limit() -> float:
    """Hard wall-clock limit of one training run: twice the budget plus 5 minutes for startup and evals
    (train.py's own watchdog allows more, so this is the outer bound)."""
    return 2 * float(os.environ.get("AUTORESEARCH_TIME_BUDGET", 300)) + 300


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


def stop_reason(new_runs: list, rules: StopRules, now: float, started: float):
    """Why the night should end, from the ledger rows added since the supervisor started; None to go on."""
    if rules.deadline is not None and now >= rules.deadline:
        return f"deadline reached ({time.strftime('%H:%M', time.localtime(rules.deadline))})"
    if rules.max_experiments is not None and len(new_runs) >= rules.max_experiments:
        return f"experiment budget used ({len(new_runs)} runs)"
    n = rules.max_consecutive_crashes
    if n and len(new_runs) >= n and all(r["status"] in verdict.FAILED_STATUSES for r in new_runs[-n:]):
        return f"{n} crashes in a row: {new_runs[-1].get('error') or 'see the latest analysis.md'}"
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
# Processes: training runs over their limit, and clean termination
# ---------------------------------------------------------------------------

def terminate(proc: subprocess.Popen):
    """SIGTERM the process group (train.py writes a crash summary, git removes its lock), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def training_processes(repo: Path) -> list:
    """[(pid, elapsed seconds)] of train.py processes running in `repo`."""
    out = subprocess.run(["ps", "-eo", "pid=,etimes=,args="], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0].isdigit() and "train.py" in parts[2].split():
            pid = int(parts[0])
            try:
                if Path(f"/proc/{pid}/cwd").exists() and Path(os.readlink(f"/proc/{pid}/cwd")) != repo.resolve():
                    continue  # another repository's run
            except OSError:
                continue
            found.append((pid, int(parts[1])))
    return found


class Supervisor:
    def __init__(self, args, repo: Path):
        self.args, self.repo = args, repo
        self.store = Store(repo)
        self.store.dir.mkdir(exist_ok=True)
        self.rules = StopRules(
            deadline=time.time() + args.hours * 3600 if args.hours else None,
            max_experiments=args.max_experiments, max_consecutive_crashes=args.max_crashes,
            max_without_keep=args.max_without_keep, max_hours_without_keep=args.max_hours_without_keep)
        self.started = time.time()
        self.start_rows = len(self.store.read_ledger())
        self.stopping = None                 # the reason, once the night is over
        self.log = open(self.store.path(SUPERVISOR_LOG), "a", buffering=1)
        self.secret = os.environ.get("ANTHROPIC_API_KEY") or None
        self.current = None                  # the running tool command of the api backend

    # bookkeeping
    def new_runs(self) -> list:
        return self.store.read_ledger()[self.start_rows:]

    def write_log(self, text: str):
        if self.secret:
            text = text.replace(self.secret, "[redacted]")  # the key never reaches a file
        self.log.write(text if text.endswith("\n") else text + "\n")

    def status(self, state: str):
        runs = self.new_runs()
        counts = {s: sum(r["status"] == s for r in runs) for s in ("keep", "discard", "crash")}
        line = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} | {state} | backend {self.args.backend} | "
                f"{len(runs)} experiments ({counts['keep']} keep, {counts['discard']} discard, "
                f"{counts['crash']} crash)\n")
        with open(self.store.path(STATUS_LOG), "a") as f:
            f.write(line)
        print(line, end="", flush=True)

    def check(self) -> bool:
        """Kill overdue training runs; True once a stop rule, the deadline or Ctrl-C says stop."""
        for pid, elapsed in training_processes(self.repo):
            if elapsed > self.args.train_timeout:
                self.write_log(f"killing train.py (pid {pid}): {elapsed} s > limit {self.args.train_timeout:.0f} s")
                self.status(f"killed a training run after {elapsed} s")
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        if self.stopping is None:
            self.stopping = stop_reason(self.new_runs(), self.rules, time.time(), self.started)
        return self.stopping is not None

    def on_sigint(self, signum, frame):
        self.stopping = CTRL_C
        if self.current is not None and self.current.poll() is None:  # a tool command (its own session)
            try:
                os.killpg(self.current.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def finish(self) -> int:
        for pid, _ in training_processes(self.repo):  # no training run outlives the supervisor
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.status(f"stopped: {self.stopping}")
        self.write_log(f"=== stopped: {self.stopping}")
        return 130 if self.stopping == CTRL_C else 0


# ---------------------------------------------------------------------------
# Backend: claude (the user's Claude Code, restarted whenever it exits)
# ---------------------------------------------------------------------------

def run_claude(sup: Supervisor) -> int:
    command = shlex.split(sup.args.claude_command)
    program = (sup.repo / PROGRAM).read_text()
    session, quick_exits, delay = 0, 0, sup.args.restart_delay
    while not sup.check():
        session += 1
        prompt = program if session == 1 else RESUME_PROMPT
        rows_before, t0 = len(sup.new_runs()), time.time()
        sup.status(f"claude session {session} started")
        sup.write_log(f"=== claude session {session} ({' '.join(command)}), {time.strftime('%Y-%m-%d %H:%M:%S')}")
        try:
            proc = subprocess.Popen(command, cwd=sup.repo, stdin=subprocess.PIPE, stdout=sup.log,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
        except FileNotFoundError:
            sup.stopping = f"cannot start {command[0]!r}: not on PATH (install Claude Code, or use --backend api)"
            break
        try:
            proc.stdin.write(prompt)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it exited before reading: handled below like any exit
        while proc.poll() is None:
            if sup.check():
                terminate(proc)
                break
            time.sleep(POLL_S)
        duration = time.time() - t0
        sup.write_log(f"=== claude session {session} exited with code {proc.returncode} after {duration:.0f} s")
        if duration < QUICK_EXIT_S and len(sup.new_runs()) == rows_before:
            quick_exits += 1
            if quick_exits >= MAX_QUICK_EXITS and sup.stopping is None:
                sup.stopping = (f"claude exited {quick_exits} times in a row within {QUICK_EXIT_S} s without an "
                                f"experiment (last exit code {proc.returncode}); see {SUPERVISOR_LOG}")
            delay = delay * 2 if delay else 0
        else:
            quick_exits, delay = 0, sup.args.restart_delay
        if sup.stopping is None:
            sup.status(f"claude session {session} exited (code {proc.returncode}); restarting")
            _sleep_unless_stopping(sup, delay)
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
     "the tail of its output. Training (`uv run train.py > run.log 2>&1`) takes about 5 minutes.",
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
    if ledger:
        last = ledger[-1]
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
            env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
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


def call_api(sup: Supervisor, client, **request):
    """messages.create, retried by the SDK with backoff, then by waiting out longer outages."""
    import anthropic
    wait = API_OUTAGE_WAIT_S
    while True:
        try:
            return client.messages.create(**request)
        except (anthropic.APIConnectionError, anthropic.RateLimitError, anthropic.InternalServerError) as e:
            sup.status(f"API unavailable ({type(e).__name__}); retrying in {wait:.0f} s")
            _sleep_unless_stopping(sup, wait)
            if sup.stopping:
                return None
            wait = min(wait * 2, 900)


def run_api(sup: Supervisor) -> int:
    import anthropic  # lazily: it takes seconds to import, and the claude backend does not need it
    if not os.environ.get("ANTHROPIC_API_KEY"):
        print("error: --backend api needs ANTHROPIC_API_KEY in the environment", file=sys.stderr)
        return 2
    client = anthropic.Anthropic(max_retries=API_MAX_RETRIES)
    system = (sup.repo / PROGRAM).read_text()
    experiment = 0
    while not sup.check():
        experiment += 1
        sup.status(f"api experiment {experiment} started")
        sup.write_log(f"=== api experiment {experiment}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
        messages = [{"role": "user", "content": experiment_prompt(sup)}]
        for _ in range(MAX_TURNS_PER_EXPERIMENT):
            response = call_api(sup, client, model=sup.args.model, max_tokens=API_MAX_TOKENS, system=system,
                                tools=TOOLS, messages=messages)
            if response is None:
                break
            content = [block.model_dump(exclude_none=True) for block in response.content]
            messages.append({"role": "assistant", "content": content})
            for block in content:
                if block["type"] == "text":
                    sup.write_log(f"[assistant] {block['text']}")
            calls = [b for b in content if b["type"] == "tool_use"]
            if not calls or sup.stopping == CTRL_C:
                break
            results = []
            for call in calls:
                sup.write_log(f"[tool {call['name']}] {json.dumps(call['input'])[:2000]}")
                text, is_error = run_tool(sup, call["name"], call["input"])
                sup.write_log(f"[result{' ERROR' if is_error else ''}] {text[-2000:]}")
                results.append({"type": "tool_result", "tool_use_id": call["id"], "content": text,
                                "is_error": is_error})
            messages.append({"role": "user", "content": results})
            if sup.check() and sup.stopping == CTRL_C:
                break  # any other stop rule lets the agent finish this experiment (keep or discard it) first
        else:
            sup.write_log(f"experiment {experiment} cut off after {MAX_TURNS_PER_EXPERIMENT} turns")
    return sup.finish()


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="supervise.py", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--backend", choices=("claude", "api"), required=True)
    parser.add_argument("--hours", type=float, help="stop after this many hours (default: no deadline)")
    parser.add_argument("--max-experiments", type=int, help="stop after this many new runs in the ledger")
    parser.add_argument("--max-crashes", type=int, default=3, help="stop after this many crashed runs in a row")
    parser.add_argument("--max-without-keep", type=int, help="stop after this many runs in a row without a keep")
    parser.add_argument("--max-hours-without-keep", type=float, help="stop after this many hours without a keep")
    parser.add_argument("--train-timeout", type=float, default=default_train_limit(),
                        help="wall-clock seconds after which a training run is killed (default: 2 x budget + 300)")
    parser.add_argument("--claude-command", default=DEFAULT_CLAUDE_COMMAND,
                        help="the agent command; program.md (then a resume prompt) goes to its stdin")
    parser.add_argument("--restart-delay", type=float, default=RESTART_DELAY_S, help="seconds before a restart")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model of the api backend")
    args = parser.parse_args(argv)
    repo = Path.cwd()
    if not (repo / PROGRAM).exists() or not (repo / "train.py").exists():
        print(f"error: run supervise.py in the repository root (no {PROGRAM} / train.py in {repo})", file=sys.stderr)
        return 2
    sup = Supervisor(args, repo)
    signal.signal(signal.SIGINT, sup.on_sigint)
    signal.signal(signal.SIGTERM, sup.on_sigint)
    sup.status(f"started (pid {os.getpid()}, stop rules: {sup.rules})")
    return run_claude(sup) if args.backend == "claude" else run_api(sup)


if __name__ == "__main__":
    sys.exit(main())
