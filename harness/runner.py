"""
One training run on this machine, as launch.py's `local` launcher runs it: train.py trains in its
own process; the number comes from another one it never ran in.

    1. launch.py becomes a child subreaper, so whatever train.py starts, even a detached
       grandchild, stays below it;
    2. the harness's evaluator (harness/evaluation.py) starts in a clean interpreter (`python -I`,
       the harness's imports only), joined to train.py by a socket pair;
    3. train.py trains; at `run.finish` it writes its summary without a number and serves its
       model's logits to the evaluator, which alone holds the targets;
    4. once train.py has exited, every process it left is killed;
    5. only then the evaluator's val_bpb and causality probes go into run_summary.json, which is
       sealed (contract.write_seal) and its `---` block printed.

A run whose train.py did not finish keeps its own failure summary (crash, nan, timeout), sealed as
it stands; a finished one whose model the evaluator could not evaluate becomes a crash that says
why.
"""

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from harness import box, contract, data, proc, settings
from harness.contract import HarnessError
from harness.fixed import LEDGER_FILE
from harness.evaluation import EVAL_FD_ENV, FAILED_EXIT, NO_MODEL_EXIT, STARTED

REPO_ROOT = Path(__file__).resolve().parent.parent
# the evaluator's interpreter: isolated (no PYTHON* variables, no user site, not the cwd on the
# path), importing the harness from this checkout only
EVALUATOR_CODE = (f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); "
                  f"from harness import evaluation; sys.exit(evaluation.main(sys.argv[1:]))")
SWEEP_ROUNDS = 50            # kill-and-reap rounds: a fork bomb of leftovers ends in a few
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # to train.py: its crash summary


COPY_CHUNK = 1 << 16         # bytes run.log's copier reads at once


# ---------------------------------------------------------------------------
# The run's lock and its log, both launch.py's
# ---------------------------------------------------------------------------

def lock_run(run_dir: Path):
    """The run lock of run_dir (flock on RUN_LOCK_FILE, this process's pid in it), held until the
    returned file is closed or the process ends: a second run here is refused before it touches
    anything, and analyze.py waits until the run is sealed."""
    f = open(Path(run_dir) / contract.RUN_LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise HarnessError(f"a run is already training in {Path(run_dir).resolve()} (pid {pid}); "
                           f"its files are untouched: wait for it, or end it") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


@contextmanager
def run_log(path: Path):
    """Everything this process and its children print from here on goes to `path` (written by
    launch.py, so no shell redirect is needed) and to the original stdout, unless that already is
    `path` (`uv run launch.py > run.log 2>&1` still writes each line once)."""
    sys.stdout.flush()
    sys.stderr.flush()
    log = open(path, "wb")
    out = os.dup(1)
    err = os.dup(2)
    mine, theirs = os.fstat(out), os.fstat(log.fileno())
    echo = (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino)
    r, w = os.pipe()

    def copy():
        while chunk := os.read(r, COPY_CHUNK):
            log.write(chunk)
            log.flush()
            if echo:
                os.write(out, chunk)

    copier = threading.Thread(target=copy, name="run.log", daemon=True)
    copier.start()
    os.dup2(w, 1)
    os.dup2(w, 2)
    os.close(w)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out, 1)
        os.dup2(err, 2)
        copier.join()  # every writer is gone: this process's copies were the last
        os.close(r)
        os.close(out)
        os.close(err)
        log.close()


# ---------------------------------------------------------------------------
# train.py and the evaluator
# ---------------------------------------------------------------------------

# a launch.py killed outright takes train.py and the evaluator along
_die_with_parent = proc.dies_with_parent(signal.SIGKILL)


def _boxed_train_start():
    """A boxed train.py's preexec_fn: dies with launch.py, and its bwrap ignores the stop signals
    that reach a whole job (Slurm's scancel, a terminal's Ctrl-C), which would kill the box and
    everything in it at once; its stopper takes them instead, and gives train.py its grace."""
    _die_with_parent()
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_IGN)


# what a boxed train.py may not change in its run directory, besides the fixed files and the
# environment: git's folder (a main checkout's) and the store (analysis/store.py)
RUN_BOX_READ_ONLY = (".git", str(Path(LEDGER_FILE).parent))


def train_command(args: list, run_dir: Path) -> list:
    """train.py ARGS, as the night's runner has it trained (settings.TRAIN_BOX): in a box of its
    own (harness/box.py) with the GPU, no network, nothing writable but its run directory, and no
    sight of launch.py or the evaluator (its own PID namespace), whose socket it inherits."""
    command = [sys.executable, contract.TRAIN_PY, *args]
    if not settings.TRAIN_BOX:
        return command
    run_dir = Path(run_dir).resolve()
    shielded = (*contract.FIXED_PATHSPECS, *box.ENVIRONMENT, *RUN_BOX_READ_ONLY)
    # a link (a worker's store) is bound where it leads, if that is in the run directory at all
    targets = {(run_dir / p).resolve() for p in shielded if (run_dir / p).exists()}
    read_only = sorted(t for t in targets if t == run_dir or run_dir in t.parents)
    return box.command(command, run_dir, writable=[run_dir], read_only=read_only)


def stop_train(pid: int, signum: int):
    """Pass a stop on to train.py (its crash summary); a boxed one through its box's stopper."""
    if settings.TRAIN_BOX:
        box.signal_stop(pid)
    else:
        os.kill(pid, signum)


def end_leftovers(keep: set):
    """Kill and reap every child of this process but `keep` (with the subreaper, every process
    train.py left)."""
    for _ in range(SWEEP_ROUNDS):
        left = [p for p in proc.children_by_parent().get(os.getpid(), []) if p not in keep]
        if not left:
            return
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        for pid in left:
            os.waitpid(pid, 0)
    raise HarnessError(f"processes left by train.py keep appearing after {SWEEP_ROUNDS} rounds "
                       f"of killing them: end them (pkill -KILL -P {os.getpid()})")


def launch(args: list, run_dir: Path) -> int:
    """Run train.py ARGS in run_dir with the evaluator beside it; train.py's exit code (1 when it
    finished but could not be evaluated)."""
    proc.prctl(proc.PR_SET_CHILD_SUBREAPER, 1)
    ours, theirs = socket.socketpair()
    # in a session of its own, as train.py: a terminal's Ctrl-C reaches launch.py, which passes it
    # on
    evaluator = subprocess.Popen([sys.executable, "-I", "-c", EVALUATOR_CODE, str(ours.fileno())],
                                 pass_fds=[ours.fileno()], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, cwd=run_dir, text=True,
                                 start_new_session=True, preexec_fn=_die_with_parent)
    if evaluator.stdout.readline().strip() != STARTED:  # its code imported before train.py runs
        evaluator.kill()
        _, err = evaluator.communicate()
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise HarnessError(f"the harness's evaluator did not start ({last}); nothing was trained")
    env = {**os.environ, **settings.TRAIN_VARIABLES, EVAL_FD_ENV: str(theirs.fileno())}
    started = time.monotonic()
    train = subprocess.Popen(train_command(args, run_dir), cwd=run_dir, env=env,
                             pass_fds=[theirs.fileno()], start_new_session=True,
                             preexec_fn=_boxed_train_start if settings.TRAIN_BOX
                             else _die_with_parent)
    ours.close()
    theirs.close()
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, frame: stop_train(train.pid, signum))
    exits = _wait_for(train.pid, evaluator.pid)
    train_s = time.monotonic() - started
    end_leftovers({evaluator.pid})
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_DFL)
    out, err = evaluator.communicate()
    if evaluator.pid not in exits:
        exits[evaluator.pid] = evaluator.returncode
    summary = complete(Path(run_dir), _result(out, err, exits[evaluator.pid]), train_s)
    if summary is not None and summary["status"] == "ok":
        print(final_block(summary), flush=True)
    code = exits[train.pid]
    return code if code else (0 if summary is None or summary["status"] == "ok" else 1)


def _wait_for(train_pid: int, evaluator_pid: int) -> dict:
    """Reap children (train.py, the evaluator, orphans) until train.py has exited; their exit
    codes by pid. A failed evaluator ends train.py."""
    exits = {}
    while train_pid not in exits:
        pid, status = os.waitpid(-1, 0)
        if pid in (train_pid, evaluator_pid):
            exits[pid] = os.waitstatus_to_exitcode(status)
        if exits.get(evaluator_pid) == FAILED_EXIT and train_pid not in exits:
            # the evaluation failed (a model that hangs or answers nonsense): train.py, which only
            # serves its model by now, is ended rather than left to its watchdog (an evaluator
            # killed from outside, with the rest of the run, leaves train.py its crash summary)
            os.kill(train_pid, signal.SIGKILL)
    return exits


def _result(out: str, err: str, code: int):
    """The evaluator's result, or {"error": why} (None when train.py never served a model)."""
    if err:
        print(err, end="", file=sys.stderr, flush=True)
    if code == NO_MODEL_EXIT:
        return None
    if code != 0:
        last = (err.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the harness's evaluator failed (exit {code}): {last}"}
    return json.loads(out)


def complete(run_dir: Path, result, train_s: float):
    """Give run_summary.json the evaluator's number (nothing else may set it) and seal it; the
    summary, or None when train.py left none (it failed before its run began) or an unreadable
    one (analyze.py reports it)."""
    path = run_dir / contract.RUN_SUMMARY
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    summary.update(val_bpb=None, causality=None, evaluator=None)
    if summary.get("status") == "ok":
        if result is None:
            result = {"error": "train.py ended without serving its model to the evaluator: end "
                               "train.py with run.finish(model, batch_size)"}
        if "error" in result:
            summary.update(status="crash", error=result["error"])
        else:
            summary.update(val_bpb=result["val_bpb"], causality=result["causality"],
                           evaluator={k: result[k] for k in ("rows", "batch_size", "seconds",
                                                             "peak_memory_mb", "device",
                                                             "val_loss")}
                           | {"train_process_s": train_s})
    text = json.dumps(summary, indent=2) + "\n"
    contract.atomic_write(path, text)
    contract.write_seal(run_dir, summary.get("started_at"), text, summary.get("metrics_sha256"),
                        summary.get("metrics_lines"), summary["val_bpb"])
    return summary


def final_block(summary: dict) -> str:
    """The `---` block a finished run prints last (`grep "^val_bpb:" run.log`), on lines of its
    own even after output that did not end its line (native libraries' messages at exit)."""
    lines = ["", "---"]
    for key in contract.FINAL_BLOCK_KEYS:
        value = summary.get(key)
        lines.append(f"{key + ':':<18}{value:.6f}" if key == "val_bpb" else
                     f"{key + ':':<18}{value:.1f}" if isinstance(value, float) else
                     f"{key + ':':<18}{value}")
    try:
        lines.append(f"{'data:':<18}{data.data_label(data.load_manifest())}")
    except HarnessError as e:
        lines.append(f"{'data:':<18}unknown ({e})")
    return "\n".join(lines)
