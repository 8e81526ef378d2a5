"""
Training runs as Slurm jobs (launch.py's `slurm` launcher): submit train.py as one batch job, stream
its output, and turn however the job ends into the run's outcome, never a hang.

    submit    sbatch --parsable --no-requeue ... --wrap "exec env ... python -u launch.py": job id
    follow    the job's output file copied to stdout as it grows; its state polled with
              `scontrol show job`
    outcome   COMPLETED with exit 0 is a finished run; any other end is a failed run whose scheduler
              state and reason go into run.log as one `launcher:` line, which analyze.py puts in
              analysis.md (TIMEOUT and DEADLINE are `timeout`, the rest `crash`). A PREEMPTED job is
              submitted again, once (Slurm's own requeue is off, so a run is never silently
              restarted twice).

The parsing of scontrol's output and the decisions are pure functions (tests run them on recorded
text); the rest calls the Slurm commands, which must be on PATH (the agents' node is a Slurm
client).
"""

import math
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import contract, settings
from harness.contract import HarnessError

LAUNCHER_PREFIX = "launcher: "      # the first word of every line launch.py adds to run.log
SUCCESS_STATES = ("COMPLETED",)
# the job ran out of its time: the run's status is `timeout`
TIMEOUT_STATES = ("TIMEOUT", "DEADLINE")
REQUEUE_STATES = ("PREEMPTED",)           # not the idea's fault: submitted again, once
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL",
                "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED")
# a pre-empted run is submitted again once; pre-empted twice, it is a crash
MAX_REQUEUES = 1
# the job runs launch.py locally on its node, its output to the job's file (copied into run.log)
JOB_LAUNCHER = f"{settings.LAUNCHER_ENV}=local {settings.SLURM_JOB_ENV}=1"
# how often the job's state is read (scontrol is cheap; one call a second)
POLL_S = 1.0
# a job id scontrol no longer knows for this long has left no state: a crash
GONE_AFTER_S = 60.0
OUTCOME = re.compile(r"^launcher: slurm job (?P<job>\S+) ended (?P<state>[A-Z_]+)(?P<rest>.*)$")


def parse_job(text: str) -> dict:
    """`scontrol show job -o ID` output as {field: value} (JobState, Reason, ExitCode, RunTime,
    ...). The one-line form separates fields by spaces; a value never starts a new `Key=` pair
    except Command and the like at the end, which are not used."""
    fields = {}
    for match in re.finditer(r"(?:^|\s)([A-Za-z_:/]+)=(\S*)", text.strip()):
        fields.setdefault(match[1], match[2])
    return fields


def job_state(fields: dict):
    """The job's base state (`CANCELLED by 0` is CANCELLED, `COMPLETING` is still running), or
    None."""
    state = (fields.get("JobState") or "").split("+")[0]
    return state or None


def outcome_line(job_id, fields: dict, notice: str = None) -> str:
    """The `launcher:` line of a job that ended: its state, Slurm's reason, its exit code and run
    time, and slurmstepd's own notice from the job's output
    (`*** JOB 5 ON n1 CANCELLED AT ... DUE TO PREEMPTION ***`)."""
    state = job_state(fields) or "UNKNOWN"
    parts = [notice] if notice else []
    reason = fields.get("Reason")
    if reason and reason != "None":
        parts.append(f"reason {reason}")
    if fields.get("ExitCode"):
        parts.append(f"exit code {fields['ExitCode']}")
    if fields.get("RunTime"):
        parts.append(f"ran {fields['RunTime']}")
    if fields.get("NodeList") and fields["NodeList"] != "(null)":
        parts.append(f"on {fields['NodeList']}")
    return (f"{LAUNCHER_PREFIX}slurm job {job_id} ended {state}"
            + (f" ({', '.join(parts)})" if parts else ""))


def run_failure(log_text: str):
    """(status, the line) of a training run that its Slurm job's end failed, from run.log: the last
    `launcher:` outcome line that is not a success; None for a run that no launcher failed."""
    lines = [m for m in (OUTCOME.match(line.rstrip()) for line in (log_text or "").splitlines())
             if m]
    if not lines or (lines[-1]["state"] in SUCCESS_STATES and "exit code 0:0" in lines[-1]["rest"]):
        return None
    last = lines[-1]
    return ("timeout" if last["state"] in TIMEOUT_STATES else "crash"), last.group(0)


def exit_code(fields: dict) -> int:
    """launch.py's exit code for a job that ended: 0 for a finished run, 124 for a timeout (as
    train.py's watchdog), else the job's own non-zero code, or 1."""
    state = job_state(fields)
    code, _, signal = (fields.get("ExitCode") or "0:0").partition(":")
    if state in SUCCESS_STATES and code == "0" and signal in ("", "0"):
        return 0
    if state in TIMEOUT_STATES:
        return 124
    return int(code) if code.isdigit() and int(code) else 1


def sbatch_command(settings: dict, run_dir: Path, python: str, args: list, time_limit_min: int,
                   job_name: str) -> list:
    """The sbatch call of one training run: one task, the GPU request, the run directory as the
    job's working directory and its output file there, the whole environment (SEED,
    AUTORESEARCH_*), no requeue."""
    command = ["sbatch", "--parsable", f"--job-name={job_name}", f"--chdir={run_dir}",
               "--export=ALL", f"--output={run_dir / '.slurm-%j.out'}", "--open-mode=append",
               "--ntasks=1", "--no-requeue", f"--time={time_limit_min}"]
    if settings.get("partition"):
        command.append(f"--partition={settings['partition']}")
    if settings.get("gres"):
        command.append(f"--gres={settings['gres']}")
    command += shlex.split(settings.get("extra") or "")
    # on the node, launch.py's local launcher: train.py and the evaluator beside it
    command.append(f"--wrap=exec env {JOB_LAUNCHER} "
                   + " ".join(shlex.quote(a) for a in [python, "-u", contract.LAUNCH_PY, *args]))
    return command


def _run(command: list, what: str) -> str:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise HarnessError(f"{command[0]} is not on PATH: this node is no Slurm client "
                           f"(install slurm-client, or run without --launcher slurm)") from None
    except subprocess.TimeoutExpired:
        raise HarnessError(f"{what} did not answer in 120 s: is slurmctld up? "
                           f"(`scontrol ping`)") from None
    if proc.returncode != 0:
        message = (proc.stderr.strip() or proc.stdout.strip()
                   or f"exit code {proc.returncode}").splitlines()[-1]
        raise HarnessError(f"{what} failed: {message}")
    return proc.stdout


def submit(command: list) -> str:
    """Submit; the job id (`--parsable` prints `id` or `id;cluster`)."""
    out = _run(command, "sbatch")
    return out.strip().split(";")[0]


def show(job_id: str):
    """The job's scontrol fields, or None once slurmctld no longer knows it (MinJobAge passed).
    Raises HarnessError when scontrol fails otherwise (slurmctld down or restarting: follow() waits
    that out)."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True,
                              text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise HarnessError("scontrol did not answer in 120 s") from None
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return None
        raise HarnessError(f"scontrol show job {job_id} failed: "
                           f"{(proc.stderr.strip() or '?').splitlines()[-1]}")
    return parse_job(proc.stdout)


def cancel(job_id: str):
    _run(["scancel", str(job_id)], "scancel")


NOTICE = re.compile(rb"\*\*\* (?:JOB|STEP) \S+ ON \S+ .*?\*\*\*")  # slurmstepd: why it ended a job


class OutputTail:
    """Copies a growing file (the job's output) to a stream, from where it last stopped, and keeps
    the last notice slurmstepd wrote into it."""

    def __init__(self, path: Path, out):
        self.path, self.out, self.offset, self.notice = Path(path), out, 0, None
        # whether what was copied ends with a newline (a line of ours may follow)
        self.at_line_start = True

    def line(self, text: str):
        """Write one line of launch.py's own after the output copied so far, on a line of its
        own."""
        self.out.write(("" if self.at_line_start else "\n").encode() + text.encode() + b"\n")
        self.out.flush()
        self.at_line_start = True

    def pump(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        if data:
            self.offset += len(data)
            self.out.write(data)
            self.out.flush()
            self.at_line_start = data.endswith(b"\n")
            found = NOTICE.findall(data)
            if found:
                self.notice = found[-1].decode(errors="replace")
        return len(data)


def follow(job_id: str, tail: OutputTail, pending_limit_s: float, cancelled_by_us,
           poll_s: float = POLL_S, show_job=show, cancel_job=cancel) -> dict:
    """Wait for the job to end, copying its output; its final scontrol fields. A job pending longer
    than `pending_limit_s` is cancelled (it would never start: a busy or unsatisfiable request); a
    job that vanishes from scontrol ends with JobState UNKNOWN. `cancelled_by_us()` says whether
    launch.py was told to stop (then the job is cancelled once and followed to its end)."""
    submitted, unknown_since, cancelled, last, problem = time.monotonic(), None, False, {}, None
    while True:
        tail.pump()
        try:
            fields = show_job(job_id)
        except HarnessError as e:
            # slurmctld restarting or overloaded: as good as unknown, for a while
            fields, problem = None, str(e)
        if fields is None:
            unknown_since = unknown_since or time.monotonic()
            if time.monotonic() - unknown_since > GONE_AFTER_S:
                tail.pump()
                return {**last, "JobState": (job_state(last) if job_state(last) in FINAL_STATES
                                             else "UNKNOWN"),
                        "Reason": problem or "the job left no state in slurmctld"}
        else:
            unknown_since, last = None, fields
            state = job_state(fields)
            if state in FINAL_STATES:
                # the last lines may reach a shared filesystem after the state does
                time.sleep(poll_s)
                tail.pump()
                return fields
            if (state == "PENDING" and time.monotonic() - submitted > pending_limit_s
                    and not cancelled):
                tail.line(f"{LAUNCHER_PREFIX}slurm job {job_id} still pending after "
                          f"{pending_limit_s:.0f} s (reason {fields.get('Reason')}): cancelling it")
                cancel_job(job_id)
                cancelled = True
        if cancelled_by_us() and not cancelled:
            tail.line(f"{LAUNCHER_PREFIX}stop requested: cancelling slurm job {job_id}")
            cancel_job(job_id)
            cancelled = True
        time.sleep(poll_s)


def say(text: str):
    print(f"{LAUNCHER_PREFIX}{text}", flush=True)


def launch(args: list, run_dir: Path) -> int:
    """Run `python train.py ARGS` in `run_dir` as a Slurm job (settings.SLURM), its output copied to
    stdout as it is written; submitted again once when pre-empted. Returns the run's exit code."""
    stop = {"asked": False}

    def on_signal(signum, frame):
        stop["asked"] = True  # follow() cancels the job and waits for its end

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    time_limit = math.ceil(settings.LIMITS["slurm_s"] / 60)
    command = sbatch_command(settings.SLURM, run_dir, sys.executable, args, time_limit,
                             f"autoresearch-{settings.WORKER}")
    for attempt in range(MAX_REQUEUES + 1):
        try:
            job = submit(command)
        except HarnessError as e:
            say(f"slurm job - ended BOOT_FAIL (never submitted: {e})")
            return 1
        say(f"submitted slurm job {job} ({' '.join(command[2:-1])})")
        tail = OutputTail(run_dir / f".slurm-{job}.out", sys.stdout.buffer)
        try:
            fields = follow(job, tail, settings.SLURM["pending_s"], lambda: stop["asked"])
        except HarnessError as e:  # scancel failed: the job may still run; only a person can tell
            tail.line(f"{LAUNCHER_PREFIX}slurm job {job} ended UNKNOWN (lost track of it: {e}; "
                      f"check it with `scontrol show job {job}`, end it with `scancel {job}`)")
            return 1
        (run_dir / f".slurm-{job}.out").unlink(missing_ok=True)
        state = job_state(fields)
        if state in REQUEUE_STATES and attempt < MAX_REQUEUES and not stop["asked"]:
            tail.line(f"{LAUNCHER_PREFIX}slurm job {job} was {state} "
                      f"({tail.notice or 'no notice'}): submitting the run again, once")
            continue
        tail.line(outcome_line(job, fields, tail.notice))
        return exit_code(fields)
    return 1  # not reached: the last attempt always returns
