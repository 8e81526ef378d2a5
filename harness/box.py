"""
Boxes (bubblewrap): a command run with the whole filesystem read-only but what it is given, a
private /tmp, its own PID and IPC namespaces (it sees no process outside, and every process in it
ends with the box), no capabilities, and, isolated, a network of its own with loopback only. The
mechanics shared by the agent's box (night/sandbox.py) and a run's (harness/runner.py); which
paths each may change is theirs to say.
"""

import os
import shutil
import signal
import site
import subprocess
import sys
from pathlib import Path

from harness import proc, settings

BWRAP = "bwrap"
# the probe of a box at a night's start: bwrap starts in well under a second
PROBE_TIMEOUT_S = 30
# besides the fixed files: what `uv run` executes before any harness code, read-only in every box
ENVIRONMENT = (".venv", "pyproject.toml", "uv.lock")
# uv needs a writable cache even for `uv run` of a synced environment; the host's stays read-only
# (a package the agent planted there would reach the night's next sync)
UV_CACHE_IN_BOX = "/tmp/uv-cache"
# Caches that would be under the read-only home: uv's, and Triton's (~/.triton, where
# torch.compile's GPU kernels go), in the box's /tmp
_CACHES = ["--setenv", "UV_CACHE_DIR", UV_CACHE_IN_BOX, "--setenv", "TRITON_HOME", "/tmp/triton"]
# GPU device nodes, bound into the box's minimal /dev where they exist
GPU_DEVICES = ("nvidia*", "dri", "kfd")
# Inside an isolated box the key proxy answers here (the box's own loopback: any free port does)
RELAY_PORT = 8417
RELAY_URL = f"http://127.0.0.1:{RELAY_PORT}"
NO_RELAY = "-"
# The box's first process below bwrap's own init: it runs the command and, told to stop (SIGTERM,
# SIGINT), passes SIGTERM to every process in the box and waits for them (train.py writes its crash
# summary, launch.py its final word, git removes its lock) before it exits, which ends the box and
# SIGKILLs what is left. Signalling the box's processes from outside all at once would not do: the
# box's first process may die first and take the others with it before they have written anything.
# Given a socket (argv[3]), it first relays every connection to RELAY_PORT on the box's loopback to
# that Unix socket (the key proxy, outside), byte for byte, in threads of its own.
STOPPER = """
import os, signal, socket, subprocess, sys, threading, time
def pump(source, sink):
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    for end in (sink, source):
        try:
            end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
def relay(server, path):
    while True:
        conn, _ = server.accept()
        out = socket.socket(socket.AF_UNIX)
        try:
            out.connect(path)
        except OSError:
            conn.close()
            continue
        for a, b in ((conn, out), (out, conn)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()
if sys.argv[3] != '""" + NO_RELAY + """':
    server = socket.create_server(('127.0.0.1', int(sys.argv[2])))
    threading.Thread(target=relay, args=(server, sys.argv[3]), daemon=True).start()
def alive():
    found = []
    for name in os.listdir('/proc'):
        if name.isdigit() and int(name) not in (1, os.getpid()):
            try:
                state = open(f'/proc/{name}/stat').read().rsplit(')', 1)[1].split()[0]
            except OSError:
                continue
            if state != 'Z':
                found.append(int(name))
    return found
def stop(signum, frame):
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    for pid in alive():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    os._exit(128 + signum)
grace = float(sys.argv[1])
signal.signal(signal.SIGTERM, stop)  # before the command starts: its exec resets them to default
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGHUP, signal.SIG_DFL)  # a box started with it ignored
child = subprocess.Popen(sys.argv[4:], close_fds=False)
code = child.wait()
sys.exit(128 - code if code < 0 else code)
"""
# beyond the stopper's grace: bwrap's own start and end
END_MARGIN_S = 10.0
SLURM_CONF_ENV = "SLURM_CONF"  # Slurm's own client setting (the launcher `slurm` runs sbatch)


def unavailable():
    """Why no box can be made on this machine, in one line (None: it can)."""
    if shutil.which(BWRAP) is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    try:
        probe = subprocess.run([BWRAP, *_base(), "--", "true"], capture_output=True, text=True,
                               timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"bwrap did not start a box within {PROBE_TIMEOUT_S} s"
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or [f"exit code {probe.returncode}"])[-1]
        return (f"bwrap cannot make a box here ({last}): unprivileged user namespaces are off "
                f"(sysctl kernel.unprivileged_userns_clone=1), or run the night in a VM")
    return None


def _base() -> list:
    """A box without any paths of its own: read-only root, private /tmp, own PID and IPC
    namespaces, no capabilities, gone with its parent."""
    return ["--die-with-parent", "--unshare-pid", "--unshare-ipc", "--new-session",
            "--cap-drop", "ALL", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--tmpfs", "/tmp"]


def _devices() -> list:
    args = []
    for pattern in GPU_DEVICES:
        for node in sorted(Path("/dev").glob(pattern)):
            args += ["--dev-bind", str(node), str(node)]
    return args


def shown_under_tmp() -> list:
    """What a box must still see of the host's /tmp, which its own hides, read-only: the Python
    environment (a checkout or venv under /tmp, and where its site-packages lead: a link may
    take them elsewhere), the commands on PATH, the prepare cache, and the Slurm client's folder
    (its slurm.conf; a cluster's munge socket may be there too)."""
    wanted = [Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent,
              *map(Path, site.getsitepackages()), Path(settings.CACHE_DIR)]
    wanted += [Path(d) for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    if os.environ.get(SLURM_CONF_ENV):
        wanted.append(Path(os.environ[SLURM_CONF_ENV]).parent)
    tmp, shown = Path("/tmp"), []
    for path in (p.resolve() for p in wanted):
        if path.is_relative_to(tmp) and path != tmp and path.exists() and path not in shown:
            shown.append(path)
    return shown


def command(run: list, cwd: Path, writable=(), read_only=(), reopened=(), isolated: bool = True,
            relay: Path = None, python: str = sys.executable) -> list:
    """`run` in a box, in `cwd`: `writable` paths bound read-write, then `read_only` ones over
    them, then `reopened` ones read-write again over those (a folder inside a read-only one);
    `isolated`: a network of its own, whose only way out is `relay` (the key proxy's Unix
    socket), reached at RELAY_URL; `python`: the interpreter of the box's stopper."""
    bwrap = [BWRAP, *_base(), *_devices(), "--setenv", "TMPDIR", "/tmp", *_CACHES]
    if isolated:  # nothing to download from: uv must not try
        bwrap += ["--unshare-net", "--setenv", "UV_OFFLINE", "1"]
    if isolated and relay is not None:  # the socket's folder: its socket may be made anew
        bwrap += ["--ro-bind", str(Path(relay).parent), str(Path(relay).parent)]
    for path in shown_under_tmp():
        bwrap += ["--ro-bind", str(path), str(path)]
    for path in writable:
        bwrap += ["--bind", str(path), str(path)]
    for path in read_only:
        bwrap += ["--ro-bind", str(path), str(path)]
    for path in reopened:
        bwrap += ["--bind", str(path), str(path)]
    stopper = [python, "-I", "-c", STOPPER, str(proc.KILL_GRACE_S), str(RELAY_PORT),
               str(relay) if relay is not None and isolated else NO_RELAY]
    return [*bwrap, "--chdir", str(Path(cwd).resolve()), "--", *stopper, *run]


def stopper_pid(box_pid: int):
    """The stopper of the box whose bwrap is `box_pid` (bwrap, its init, then the stopper), or
    None while the box is starting or gone."""
    children = proc.children_by_parent()
    for init in children.get(box_pid, []):
        for pid in children.get(init, []):
            return pid
    return None


def signal_stop(box_pid: int, sig: int = signal.SIGTERM):
    """Ask the box to stop (`sig` to its stopper); returns at once (a signal handler's)."""
    pid = stopper_pid(box_pid)
    if pid is not None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # it just ended


def end(child: subprocess.Popen):
    """End a boxed command and wait for it: its processes get SIGTERM and the stopper's grace,
    then the box is killed whole."""
    signal_stop(child.pid)
    try:
        child.wait(timeout=proc.KILL_GRACE_S + END_MARGIN_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
