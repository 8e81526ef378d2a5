"""
The night's runner: training runs and bookkeeping executed by the night, outside the agent's box.
The agent's `uv run launch.py` and `uv run analyze.py ...` (harness/nightrun.py) ask here, through
a Unix socket bound into its box; the command then runs in the supervisor's worktree with the
night's environment, outside every box, so the evaluator and the seal, the ledger and the archive
are out of the agent's reach; launch.py trains train.py in a box of its own (harness/runner.py).
What it prints is streamed back as it comes; the asker's end (Ctrl-C, a timeout, the session's
end) ends the command, a run with its grace.
"""

import json
import signal
import socketserver
import subprocess
import tempfile
import threading
from pathlib import Path

from harness import nightrun, proc, settings
from night.environment import harness_command, harness_environment

SOCKET_NAME = "run.sock"
CHUNK = 64 * 1024
# the harness's settings are the night's, never the asker's: AUTORESEARCH_* stays the night's
NIGHT_PREFIX = "AUTORESEARCH_"
# a launch.py told to end passes it to train.py, which writes its crash summary; then the seal
END_WAIT_S = proc.KILL_GRACE_S + 30


class _Handler(socketserver.StreamRequestHandler):
    """One `launch.py` of the agent's: its request read, the run started and streamed back."""

    def handle(self):
        runner = self.server.runner
        try:
            request = json.loads(self.rfile.readline(nightrun.MAX_REQUEST))
            script, argv, env, cwd = (request["script"], request["argv"], request["env"],
                                      request["cwd"])
            if not (script in nightrun.SCRIPTS and isinstance(cwd, str)
                    and all(isinstance(a, str) for a in argv)
                    and all(isinstance(v, str) for v in env.values())):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            self._say(b"error: the night's runner got a request it cannot read\n", 2)
            return
        if Path(cwd).resolve() != runner.sup.repo.resolve():
            self._say(f"error: run {script} in the worktree's root, {runner.sup.repo.resolve()} "
                      f"(not in {cwd})\n".encode(), 1)
            return
        run = runner.start(script, argv, env)
        # the asker sends nothing more: its socket closing means it is gone
        threading.Thread(target=self._end_when_gone, args=(run,), daemon=True).start()
        try:
            while chunk := run.stdout.read1(CHUNK):
                nightrun.send_frame(self.request, nightrun.OUTPUT, chunk)
        except OSError:
            run.stdout.read()  # the asker is gone; the run ends (_end_when_gone) and is drained
        self._say(b"", run.wait())
        runner.done(run)

    def _end_when_gone(self, run: subprocess.Popen):
        try:
            while self.request.recv(1):
                pass
        except OSError:
            pass
        if run.poll() is None:
            run.send_signal(signal.SIGTERM)

    def _say(self, text: bytes, code: int):
        try:
            if text:
                nightrun.send_frame(self.request, nightrun.OUTPUT, text)
            nightrun.send_frame(self.request, nightrun.EXIT, str(code).encode())
        except OSError:
            pass  # the asker is gone


class RunService:
    """The runner of one agent's worktree: listens until close(), which ends the runs in
    progress."""

    def __init__(self, sup):
        self.sup, self.runs, self.lock = sup, set(), threading.Lock()
        self.folder = Path(tempfile.mkdtemp(prefix="alr-runs-"))  # 0700: this user's only
        self.socket = self.folder / SOCKET_NAME
        self.server = socketserver.ThreadingUnixStreamServer(str(self.socket), _Handler)
        self.server.daemon_threads, self.server.runner = True, self
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def environment(self, script: str, asked: dict) -> dict:
        """The night's (as its agent's commands get it); for launch.py with train.py boxed and the
        asker's own variables (SEED, ...) for train.py only."""
        env = harness_environment(self.sup.args.pass_env, night=self.sup.night,
                                  agent=self.sup.agent)
        if script == "launch.py":
            own = {k: v for k, v in asked.items() if not k.startswith(NIGHT_PREFIX)}
            env.update({settings.TRAIN_BOX_ENV: "1",
                        settings.TRAIN_VARIABLES_ENV: json.dumps(own)})
        return env

    def start(self, script: str, argv: list, asked: dict) -> subprocess.Popen:
        run = subprocess.Popen(harness_command(script, *argv), cwd=self.sup.repo,
                               env=self.environment(script, asked), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
        with self.lock:
            self.runs.add(run)
        return run

    def done(self, run: subprocess.Popen):
        with self.lock:
            self.runs.discard(run)

    def close(self):
        """Stop listening; end the runs in progress (each launch.py passes it on to train.py,
        which writes its crash summary, and seals it) and wait for them."""
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            runs = list(self.runs)
        for run in runs:
            if run.poll() is None:
                run.send_signal(signal.SIGTERM)
        for run in runs:
            try:
                run.wait(timeout=END_WAIT_S)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait()
        self.socket.unlink(missing_ok=True)
        self.folder.rmdir()
