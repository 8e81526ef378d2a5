"""
A throw-away single-node Slurm cluster on localhost, for integration tests of code that submits
jobs with sbatch (CPU-only machine, Debian 12 Slurm 22.05 packages, run as root).

Everything lives under one directory DIR: slurm.conf, gres.conf, plugstack.conf (empty), a private
munge key (0600) and socket (slurm.conf points auth/munge and cred/munge at it with
AuthInfo=socket=...), state, spool, pid files (DIR/run) and the daemon logs (DIR/log/*.log). The
daemons listen on 127.0.0.1 only, on two free TCP ports picked at each start, so two clusters, or a
leftover, never clash with each other or with a system Slurm/munge. Each start is a fresh cluster
(state wiped). The node is the real short hostname with what `slurmd -C` reports,
plus one fake GPU (gpus=N for more): `--gres gpu:1` is accepted, gres.conf is `Name=gpu
File=DIR/dev/gpu0` (a dummy character device), jobs see CUDA_VISIBLE_DEVICES=0, and a second GPU
job waits for the first. Partition `debug` (default, MaxTime=INFINITE) and `urgent`, a higher
priority tier that pre-empts it (PreemptType=preempt/partition_prio, PreemptMode=CANCEL: the pre-empted
job ends PREEMPTED). start() runs a probe
job (job 1, named slurm_local_probe) before returning, so test jobs start at 2. No cgroups
(proctrack/linuxproc, task/none), no accounting: sacct says "Slurm accounting storage is disabled".
Finished jobs stay in `scontrol show job` / `squeue -t all` for MinJobAge (300 s). On scancel or a
time limit every process of the job gets SIGTERM, SIGKILL KillWait (5 s) later. Note `sbatch
--wait` polls 2, 10, 42, 74, ... s after submission (see MIN_JOB_AGE_S). stop() kills the jobs too.

As a script:
    python3 bench/slurm_local.py start  [--dir DIR]   # prints `export SLURM_CONF=...`
    python3 bench/slurm_local.py status [--dir DIR]   # exit 0 running, 3 not
    python3 bench/slurm_local.py stop   [--dir DIR]
DIR defaults to /tmp/slurm-local. In a shell: eval "$(python3 bench/slurm_local.py start)".

From a pytest fixture:
    sys.path.insert(0, "bench"); from slurm_local import LocalSlurm, available
    reason = available()
    if reason: pytest.skip(reason)
    cluster = LocalSlurm(tmp_path / "slurm"); env = cluster.start()   # {"SLURM_CONF": ...}
    try: subprocess.run(["sbatch", ...], env={**os.environ, **env}) ...
    finally: cluster.stop()

Needs the Debian packages slurmctld slurmd slurm-client munge (they pull in
slurm-wlm-basic-plugins). Standard library only.
"""

import argparse
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DIR = "/tmp/slurm-local"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")
PARTITION = "debug"
URGENT_PARTITION = "urgent"  # a higher priority tier: a job there pre-empts (cancels) a `debug` job for its GPU
KILL_WAIT_S = 5          # seconds between SIGTERM and SIGKILL when a job is cancelled / times out
# How long a finished job stays in `scontrol show job`. It also sets how often `sbatch --wait`
# polls: it sleeps 2 s, then x4 while the sleep is < MinJobAge/2 (max 32 s), so it returns 2, 10,
# 42, 74, ... s after submission: MinJobAge<=4 polls every 2 s, <=16 every 8 s, >=65 every 32 s.
MIN_JOB_AGE_S = 300


def available():
    """None when a local cluster can be started here, else a one-line reason (for pytest.skip)."""
    missing = [b for b in BINARIES if shutil.which(b) is None
               and not os.path.exists(os.path.join("/usr/sbin", b))]
    if missing:
        return ("slurm/munge binaries missing: " + " ".join(missing)
                + " (apt-get install slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        return "a local slurm cluster needs root (slurmd runs jobs as their user)"
    return None


def _which(name):
    return shutil.which(name) or os.path.join("/usr/sbin", name)


def _free_ports(n):
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _alive(pid):
    """True while pid runs (a zombie counts as ended: no init may reap it in a container)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _tail(path, n=15):
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"[{Path(path).name}: no log]"
    return "\n".join(f"[{Path(path).name}] {line}" for line in lines[-n:])


class LocalSlurm:
    """One local cluster rooted at `dir`. start() -> env dict; stop(); status() -> dict."""

    DAEMONS = ("slurmd", "slurmctld", "munged")     # stop order

    def __init__(self, dir=DEFAULT_DIR, timeout=60.0, min_job_age=MIN_JOB_AGE_S,
                 kill_wait=KILL_WAIT_S, gpus=1):
        self.dir = Path(dir).resolve()
        self.gpus = int(gpus)
        self.timeout = timeout
        self.min_job_age = int(min_job_age)
        self.kill_wait = int(kill_wait)
        self.conf = self.dir / "slurm.conf"
        self.log_dir = self.dir / "log"
        self.run_dir = self.dir / "run"
        self.munge_dir = self.dir / "munge"
        self.munge_socket = self.munge_dir / "munge.socket.2"
        self.munge_key = self.munge_dir / "munge.key"
        self.hostname = socket.gethostname().split(".")[0]

    # -- paths -----------------------------------------------------------------------------
    def pid_file(self, daemon):
        return self.run_dir / f"{daemon}.pid"

    def log_file(self, daemon):
        return self.log_dir / f"{daemon}.log"

    def env(self):
        """The variables a client (sbatch, squeue, scontrol, ...) needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _run_env(self):
        env = dict(os.environ)
        for key in list(env):        # a caller's SLURM_* job variables would confuse the daemons
            if key.startswith(("SLURM_", "SBATCH_", "SQUEUE_")):
                del env[key]
        env.update(self.env())
        return env

    # -- configuration ---------------------------------------------------------------------
    def _node_line(self):
        """NodeName=<host> CPUs=.. Boards=.. ... RealMemory=.. as slurmd -C reports it."""
        out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
        first = next((line for line in out.splitlines() if line.startswith("NodeName=")), "")
        fields = dict(f.split("=", 1) for f in first.split() if "=" in f)
        keep = ["CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore",
                "RealMemory"]
        if "CPUs" not in fields:
            fields = {"CPUs": str(os.cpu_count() or 1)}
        attrs = " ".join(f"{k}={fields[k]}" for k in keep if k in fields)
        return (f"NodeName={self.hostname} NodeAddr=127.0.0.1 NodeHostname={self.hostname} "
                f"{attrs} Gres=gpu:{self.gpus} State=UNKNOWN")

    def write_config(self, ctld_port, slurmd_port):
        d = self.dir
        for sub in ("log", "run", "state", "spool", "munge", "tmp"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "spool" / f"slurmd-{self.hostname}").mkdir(exist_ok=True)
        os.chmod(d / "munge", 0o755)     # socket usable by every local user; the key is 0600
        conf = f"""\
# Written by bench/slurm_local.py: a private single-node test cluster. Do not edit; regenerated.
ClusterName=localtest
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/slurmd-%n
SlurmctldPidFile={self.pid_file('slurmctld')}
SlurmdPidFile={self.pid_file('slurmd')}
SlurmctldLogFile={self.log_file('slurmctld')}
SlurmdLogFile={self.log_file('slurmd')}
SlurmctldDebug=info
SlurmdDebug=info
TmpFS={d}/tmp
PlugStackConfig={d}/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
PreemptType=preempt/partition_prio
PreemptMode=CANCEL
GresTypes=gpu
ReturnToService=2
MinJobAge={self.min_job_age}
KillWait={self.kill_wait}
InactiveLimit=0
SlurmdTimeout=300
SlurmctldTimeout=120
{self._node_line()}
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName={URGENT_PARTITION} Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2
"""
        self.conf.write_text(conf)
        # gres/gpu drops a GPU without File= ("count reported lower than configured (0 < 1)"),
        # and with a regular file jobs get an empty CUDA_VISIBLE_DEVICES, so each fake GPU is a
        # character device DIR/dev/gpuN (195,N like /dev/nvidiaN; nothing opens it); without
        # CAP_MKNOD one GPU falls back to /dev/null. Jobs see CUDA_VISIBLE_DEVICES=0, 1, ...
        (d / "dev").mkdir(exist_ok=True)
        files = f"{d}/dev/gpu0" if self.gpus == 1 else f"{d}/dev/gpu[0-{self.gpus - 1}]"
        try:
            for i in range(self.gpus):
                dev = d / "dev" / f"gpu{i}"
                if not dev.exists():
                    os.mknod(dev, stat.S_IFCHR | 0o600, os.makedev(195, i))
        except OSError as e:
            if self.gpus != 1:
                raise RuntimeError(f"local slurm: cannot make fake GPU devices: {e}") from e
            files = "/dev/null"
        (d / "gres.conf").write_text(f"Name=gpu File={files}\n")
        (d / "plugstack.conf").write_text("")                  # not the system's /etc/slurm one
        for p in (self.conf, d / "gres.conf", d / "plugstack.conf"):
            os.chmod(p, 0o644)

    def _write_munge_key(self):
        if not self.munge_key.exists():
            fd = os.open(self.munge_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(1024))
        os.chmod(self.munge_key, 0o600)

    # -- processes -------------------------------------------------------------------------
    def _pid(self, daemon):
        try:
            pid = int(self.pid_file(daemon).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def status(self):
        """{'munged': pid or None, 'slurmctld': ..., 'slurmd': ...}."""
        return {d: self._pid(d) for d in reversed(self.DAEMONS)}

    def _fail(self, what):
        tails = []
        for d in reversed(self.DAEMONS):
            tails.append(_tail(self.log_file(d), 12))
            out = self.log_dir / f"{d}.out"
            if out.exists() and out.stat().st_size:
                tails.append(_tail(out, 5))
        tails = "\n".join(tails)
        self.stop()
        raise RuntimeError(f"local slurm in {self.dir}: {what}\n{tails}")

    def _launch(self, daemon, argv):
        """Run a daemon that forks itself into the background; wait for its pid file."""
        self.pid_file(daemon).unlink(missing_ok=True)
        with open(self.log_dir / f"{daemon}.out", "wb") as out:   # what it says before logging
            r = subprocess.run(argv, env=self._run_env(), stdin=subprocess.DEVNULL, stdout=out,
                               stderr=subprocess.STDOUT, timeout=self.timeout,
                               start_new_session=True, check=False)
        if r.returncode != 0:
            self._fail(f"{' '.join(argv)} exited {r.returncode}")
        deadline = time.monotonic() + self.timeout
        while self._pid(daemon) is None:
            if time.monotonic() > deadline:
                self._fail(f"{daemon} wrote no live pid to {self.pid_file(daemon)}")
            time.sleep(0.1)

    def _query(self, argv):
        try:
            r = subprocess.run(argv, env=self._run_env(), capture_output=True, text=True,
                               timeout=15, check=False)
        except subprocess.TimeoutExpired:
            return 1, ""
        return r.returncode, r.stdout.strip()

    def start(self):
        """Start munged, slurmctld and slurmd; wait until the node is idle. Returns env vars."""
        reason = available()
        if reason:
            raise RuntimeError(reason)
        self.stop()                                   # a leftover cluster in the same dir
        if len(str(self.munge_socket)) > 100:
            raise RuntimeError(f"local slurm: dir too long for a unix socket: {self.munge_socket}")
        for stale in ("state", "spool", "tmp"):       # every start is a fresh cluster
            shutil.rmtree(self.dir / stale, ignore_errors=True)
        ctld_port, slurmd_port = _free_ports(2)
        self.write_config(ctld_port, slurmd_port)
        self._write_munge_key()
        for daemon in self.DAEMONS:
            self.log_file(daemon).unlink(missing_ok=True)
            (self.log_dir / f"{daemon}.out").unlink(missing_ok=True)

        self._launch("munged", [
            _which("munged"), "--force", f"--socket={self.munge_socket}",
            f"--key-file={self.munge_key}", f"--pid-file={self.pid_file('munged')}",
            f"--log-file={self.log_file('munged')}", f"--seed-file={self.munge_dir}/munged.seed",
            "--num-threads=4"])
        self._wait_socket()
        self._launch("slurmctld", [_which("slurmctld"), "-c", "-f", str(self.conf)])
        self._launch("slurmd", [_which("slurmd"), "-f", str(self.conf), "-N", self.hostname])

        deadline = time.monotonic() + self.timeout
        last = ""
        while True:
            for d in reversed(self.DAEMONS):
                if self._pid(d) is None:
                    self._fail(f"{d} exited during start-up")
            rc, ping = self._query(["scontrol", "ping"])
            if rc == 0 and "UP" in ping:
                rc, state = self._query(["sinfo", "-h", "-N", "-n", self.hostname, "-p", PARTITION, "-o", "%T"])
                last = state or last
                if rc == 0 and state.rstrip("*").split("+")[0] in ("idle", "mixed"):
                    self._probe(deadline)
                    return self.env()
                if rc == 0 and state.startswith(("down", "drain", "fail", "inval")):
                    rc, why = self._query(["sinfo", "-h", "-N", "-n", self.hostname, "-p", PARTITION, "-o", "%E"])
                    self._fail(f"node {self.hostname} is {state}: {why}")
            else:
                last = ping or last
            if time.monotonic() > deadline:
                self._fail(f"not ready after {self.timeout:.0f} s (last: {last or 'no answer'})")
            time.sleep(0.25)

    def _probe(self, deadline):
        """Run one trivial job (job 1, name slurm_local_probe) to be sure jobs run end to end;
        it also absorbs slurmctld's first-scheduling delay (~3 s after it starts)."""
        rc, job = self._query(["sbatch", "--parsable", "--job-name=slurm_local_probe",
                               "--output=/dev/null", f"--chdir={self.dir}", "--wrap", "true"])
        if rc != 0 or not job.split(";")[0].isdigit():
            self._fail(f"probe sbatch failed: {job or 'no job id'}")
        job = job.split(";")[0]
        state = "?"
        while time.monotonic() < deadline:
            rc, out = self._query(["scontrol", "show", "job", "-o", job])
            state = next((f.split("=", 1)[1] for f in out.split() if f.startswith("JobState=")),
                         state)
            if state == "COMPLETED":
                return
            if state in ("FAILED", "CANCELLED", "NODE_FAIL", "TIMEOUT", "OUT_OF_MEMORY",
                         "BOOT_FAIL", "DEADLINE"):
                self._fail(f"probe job {job} ended {state}")
            time.sleep(0.1)
        self._fail(f"probe job {job} still {state} after {self.timeout:.0f} s")

    def _wait_socket(self):
        deadline = time.monotonic() + self.timeout
        while not self.munge_socket.is_socket():
            if time.monotonic() > deadline or self._pid("munged") is None:
                self._fail(f"munged made no socket {self.munge_socket}")
            time.sleep(0.05)

    def _cancel_jobs(self, timeout):
        """Kill every job of this cluster (else slurmstepd and the job outlive slurmd)."""
        if self._pid("slurmctld") is None:
            return
        rc, ids = self._query(["squeue", "-h", "-o", "%A"])
        if rc != 0 or not ids.split():
            return
        self._query(["scancel", "--full", "--signal=KILL"] + ids.split())
        self._query(["scancel"] + ids.split())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc, left = self._query(["squeue", "-h", "-o", "%A"])
            if rc != 0 or not left:
                return
            time.sleep(0.25)

    def _kill_stepds(self):
        """SIGKILL the slurmstepd processes of this cluster's slurmd, and their descendants."""
        mark = f"SLURM_CONF={self.conf}".encode() + b"\0"
        parent, stepds = {}, []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    head, rest = f.read().rsplit(")", 1)
                parent[int(entry)] = int(rest.split()[1])
                if head.split("(", 1)[1].startswith("slurmstepd"):
                    with open(f"/proc/{entry}/environ", "rb") as f:
                        if mark in b"\0" + f.read():
                            stepds.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
        doomed = set(stepds)
        grew = True
        while grew:
            new = {pid for pid, pp in parent.items() if pp in doomed} - doomed
            doomed |= new
            grew = bool(new)
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def stop(self, timeout=30.0):
        """Kill this cluster's jobs, then SIGTERM each daemon in its pid file (slurmd,
        slurmctld, munged) and wait for it to exit (SIGKILL after `timeout` s)."""
        self._cancel_jobs(timeout=15.0)
        self._kill_stepds()
        for daemon in self.DAEMONS:
            pid = self._pid(daemon)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                while _alive(pid) and time.monotonic() < deadline + 5:
                    time.sleep(0.05)
            self.pid_file(daemon).unlink(missing_ok=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split(").")[0].split()) + ").")
    p.add_argument("action", choices=("start", "stop", "status"))
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"cluster directory [{DEFAULT_DIR}]")
    p.add_argument("--timeout", type=float, default=60.0, help="start-up bound in seconds")
    p.add_argument("--min-job-age", type=int, default=MIN_JOB_AGE_S,
                   help=f"seconds a finished job stays visible [{MIN_JOB_AGE_S}]")
    p.add_argument("--gpus", type=int, default=1, help="fake GPUs on the node [1]")
    p.add_argument("--kill-wait", type=int, default=KILL_WAIT_S,
                   help=f"seconds from SIGTERM to SIGKILL on cancel/timeout [{KILL_WAIT_S}]")
    a = p.parse_args(argv)
    cluster = LocalSlurm(a.dir, timeout=a.timeout, min_job_age=a.min_job_age,
                         kill_wait=a.kill_wait, gpus=a.gpus)
    if a.action == "start":
        try:
            env = cluster.start()
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        for k, v in env.items():
            print(f"export {k}={v}")
        return 0
    if a.action == "stop":
        cluster.stop()
        print(f"stopped ({cluster.dir})")
        return 0
    st = cluster.status()
    running = all(st.values())
    print(("running" if running else "stopped" if not any(st.values()) else "partial")
          + f" {cluster.dir} " + " ".join(f"{k}={v or '-'}" for k, v in st.items()))
    return 0 if running else 3


if __name__ == "__main__":
    sys.exit(main())
