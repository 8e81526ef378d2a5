"""launch.py and analysis/slurm.py without a cluster: how a Slurm job's end becomes the run's outcome (on
scontrol's own output, recorded from Slurm 22.05), how a job is followed (pending too long, vanished,
stopped), and the launcher setting. The real cluster is tests/test_slurm.py's."""

import io
import subprocess
import sys

import pytest

from harness import slurm
from harness.contract import HarnessError
from conftest import ROOT

# `scontrol show job -o 5` of a job cancelled mid-run (Slurm 22.05, fields cut for length)
CANCELLED = ("JobId=5 JobName=autoresearch-gpu1 UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=1 Nice=0 "
             "Account=(null) QOS=(null) JobState=CANCELLED Reason=None Dependency=(null) Requeue=0 Restarts=0 "
             "BatchFlag=1 Reboot=0 ExitCode=0:15 RunTime=00:00:04 TimeLimit=00:13:00 TimeMin=N/A "
             "Partition=debug NodeList=vm BatchHost=vm NumNodes=1 NumCPUs=1 TRES=cpu=1,node=1,gres/gpu=1 "
             "Command=(null) WorkDir=/work/repo StdOut=/work/repo/.slurm-5.out")
TIMED_OUT = CANCELLED.replace("JobState=CANCELLED Reason=None", "JobState=TIMEOUT Reason=TimeLimit").replace(
    "ExitCode=0:15", "ExitCode=0:9").replace("RunTime=00:00:04", "RunTime=00:14:26")
FAILED = CANCELLED.replace("JobState=CANCELLED Reason=None", "JobState=FAILED Reason=NonZeroExitCode").replace(
    "ExitCode=0:15", "ExitCode=3:0")
COMPLETED = CANCELLED.replace("JobState=CANCELLED", "JobState=COMPLETED").replace("ExitCode=0:15", "ExitCode=0:0")


def test_scontrols_one_line_output_is_read_field_by_field():
    fields = slurm.parse_job(CANCELLED)
    assert (fields["JobState"], fields["Reason"], fields["ExitCode"], fields["RunTime"], fields["NodeList"]) == \
        ("CANCELLED", "None", "0:15", "00:00:04", "vm")
    assert slurm.job_state({"JobState": "CANCELLED+"}) == "CANCELLED" and slurm.job_state({}) is None


@pytest.mark.parametrize("text, line, status, code", [
    (CANCELLED, "launcher: slurm job 5 ended CANCELLED (exit code 0:15, ran 00:00:04, on vm)", "crash", 1),
    (TIMED_OUT, "launcher: slurm job 5 ended TIMEOUT (reason TimeLimit, exit code 0:9, ran 00:14:26, on vm)",
     "timeout", 124),
    (FAILED, "launcher: slurm job 5 ended FAILED (reason NonZeroExitCode, exit code 3:0, ran 00:00:04, on vm)",
     "crash", 3),
])
def test_a_job_that_did_not_complete_is_a_failed_run_with_the_schedulers_words(text, line, status, code):
    fields = slurm.parse_job(text)
    assert slurm.outcome_line(5, fields) == line
    assert slurm.exit_code(fields) == code
    log = "step 00010 | loss 5.1\n" + line + "\n"
    assert slurm.run_failure(log) == (status, line)


def test_a_completed_job_is_no_failure_and_the_notice_is_quoted():
    fields = slurm.parse_job(COMPLETED)
    line = slurm.outcome_line(5, fields)
    assert line == "launcher: slurm job 5 ended COMPLETED (exit code 0:0, ran 00:00:04, on vm)"
    assert slurm.exit_code(fields) == 0 and slurm.run_failure("val_bpb: 1.0\n" + line) is None
    notice = "*** JOB 5 ON vm CANCELLED AT 2026-12-01T12:43:22 DUE TO PREEMPTION ***"
    assert slurm.outcome_line(5, slurm.parse_job(CANCELLED), notice).startswith(f"launcher: slurm job 5 ended CANCELLED ({notice}, ")
    # a pre-empted attempt that was submitted again is not the run's end: the last outcome line is
    log = f"launcher: slurm job 4 was PREEMPTED ({notice}): submitting the run again, once\n{line}\n"
    assert slurm.run_failure(log) is None


def test_the_output_tail_copies_what_grows_and_keeps_slurmsteps_last_notice(tmp_path):
    path, out = tmp_path / ".slurm-5.out", io.BytesIO()
    tail = slurm.OutputTail(path, out)
    assert tail.pump() == 0  # not there yet: the job has not started
    path.write_bytes(b"step 00000 | loss 6.9\nstep 0")
    tail.pump()
    with open(path, "ab") as f:
        f.write(b"0001 | loss 6.5\nslurmstepd-vm: error: *** JOB 5 ON vm CANCELLED AT 2026-12-01T12:43:22 ***")
    tail.pump()
    tail.line("launcher: slurm job 5 ended CANCELLED")
    assert out.getvalue() == (b"step 00000 | loss 6.9\nstep 00001 | loss 6.5\nslurmstepd-vm: error: *** JOB 5 ON vm "
                              b"CANCELLED AT 2026-12-01T12:43:22 ***\nlauncher: slurm job 5 ended CANCELLED\n")
    assert tail.notice == "*** JOB 5 ON vm CANCELLED AT 2026-12-01T12:43:22 ***"


class Scheduler:
    """The states a job goes through, one per poll, and the cancellations asked of it."""

    def __init__(self, states):
        self.states, self.cancelled = list(states), []

    def show(self, job):
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        if state == "DOWN":
            raise HarnessError("scontrol show job 7 failed: Unable to contact slurm controller")
        return None if state is None else {"JobState": state, "Reason": "Resources"}

    def cancel(self, job):
        self.cancelled.append(job)
        self.states = ["CANCELLED"]


def follow(scheduler, tmp_path, pending_s=1e9, stop=lambda: False):
    out = io.BytesIO()
    fields = slurm.follow("7", slurm.OutputTail(tmp_path / "out", out), pending_s, stop, poll_s=0,
                          show_job=scheduler.show, cancel_job=scheduler.cancel)
    return fields, out.getvalue().decode()


def test_a_job_pending_too_long_is_cancelled_once(tmp_path):
    scheduler = Scheduler(["PENDING"])
    fields, out = follow(scheduler, tmp_path, pending_s=0)
    assert fields["JobState"] == "CANCELLED" and scheduler.cancelled == ["7"]
    assert "launcher: slurm job 7 still pending after 0 s (reason Resources): cancelling it" in out


def test_a_stop_cancels_the_job_and_waits_for_its_end(tmp_path):
    scheduler = Scheduler(["RUNNING", "RUNNING", "COMPLETING"])
    fields, out = follow(scheduler, tmp_path, stop=lambda: True)
    assert fields["JobState"] == "CANCELLED" and scheduler.cancelled == ["7"]
    assert "launcher: stop requested: cancelling slurm job 7" in out


def test_a_job_slurmctld_forgets_ends_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(slurm, "GONE_AFTER_S", 0.0)
    scheduler = Scheduler(["RUNNING", None])
    fields, _ = follow(scheduler, tmp_path)
    assert fields["JobState"] == "UNKNOWN" and "no state" in fields["Reason"]


def test_a_controller_that_is_away_for_a_moment_does_not_end_the_run(tmp_path):
    scheduler = Scheduler(["RUNNING", "DOWN", "DOWN", "RUNNING", "COMPLETED"])
    fields, _ = follow(scheduler, tmp_path)
    assert fields["JobState"] == "COMPLETED" and scheduler.cancelled == []


def test_a_controller_away_for_good_ends_the_run_unknown_with_its_error(tmp_path, monkeypatch):
    monkeypatch.setattr(slurm, "GONE_AFTER_S", 0.0)
    fields, _ = follow(Scheduler(["RUNNING", "DOWN"]), tmp_path)
    assert fields["JobState"] == "UNKNOWN" and "Unable to contact slurm controller" in fields["Reason"]


def test_sbatch_gets_the_gpu_the_run_directory_and_no_requeue(tmp_path):
    command = slurm.sbatch_command({"partition": "gpu", "gres": "gpu:1", "extra": "--account=a --qos=q"}, tmp_path,
                                   "/venv/bin/python", ["--x"], 13, "autoresearch-gpu0")
    assert command[:2] == ["sbatch", "--parsable"] and "--no-requeue" in command
    assert {"--partition=gpu", "--gres=gpu:1", "--account=a", "--qos=q", "--time=13", f"--chdir={tmp_path}",
            "--export=ALL", "--job-name=autoresearch-gpu0"} <= set(command)
    assert command[-1] == "--wrap=exec env AUTORESEARCH_LAUNCHER=local AUTORESEARCH_SLURM_JOB=1 /venv/bin/python -u launch.py --x"
    plain = slurm.sbatch_command({"partition": None, "gres": "", "extra": None}, tmp_path, "py", [], 1, "j")
    assert not any(a.startswith(("--partition", "--gres")) for a in plain)


def test_an_unknown_launcher_is_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py")], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "AUTORESEARCH_LAUNCHER": "kubernetes"})
    assert proc.returncode == 1
    assert proc.stderr == ("error: AUTORESEARCH_LAUNCHER='kubernetes' is not a launcher; use one of local, slurm "
                           "(default local)\n")
