"""
Processes, read from /proc: their state, age, parent and environment, and ending them (SIGTERM,
then SIGKILL). The night finds and ends its processes with these; the store tells a live writer
from a dead one; a run measures its own age.
"""

import ctypes
import fcntl
import os
import signal
import time
from pathlib import Path

KILL_GRACE_S = 15.0   # SIGTERM first (train.py writes its crash summary), SIGKILL after this
PR_SET_PDEATHSIG = 1  # prctl(2): a signal for the child when its parent dies
PR_SET_CHILD_SUBREAPER = 36  # prctl(2): orphans below this process are re-parented to it
PR_SET_DUMPABLE = 4  # prctl(2): 0 closes /proc/<pid>/mem, environ and ptrace to the same user
WAIT_POLL_S = 0.2     # how often the processes being ended are looked at


def pids() -> list:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def proc_stat(pid: int):
    """(state, ppid, start time in seconds since boot) of a process, or None once it is gone (or
    without /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[19]) / os.sysconf("SC_CLK_TCK")


def pid_alive(pid: int) -> bool:
    """Whether a live process has this pid (another user's counts; a zombie does not: it has exited
    and holds no file, it only waits to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    stat = proc_stat(pid)
    return stat is None or stat[0] not in ("Z", "X")  # no /proc to tell (macOS): the process exists


def runs_script(pid: int, script: str) -> bool:
    """Whether a live process of this pid runs `script` (a pid may have been reused since)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return running(pid) and any(a == script.encode() or a.endswith(b"/" + script.encode())
                                for a in args[:4])


def running(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped (a process this user can read in /proc)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def process_age(pid: int):
    """Seconds since the process started (from /proc, so a just-started run is never taken for an
    old one); None when it is gone."""
    stat = proc_stat(pid)
    if stat is None:
        return None
    return float(Path("/proc/uptime").read_text().split()[0]) - stat[2]


def children_by_parent() -> dict:
    """{ppid: [pid, ...]} of the process table now."""
    children = {}
    for p in pids():
        stat = proc_stat(p)
        if stat:
            children.setdefault(stat[1], []).append(p)
    return children


def descendants(pid: int) -> set:
    """Every process below pid (children, their children, ...), as the process table is now."""
    children = children_by_parent()
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def environ(pid: int) -> list:
    """The NAME=value entries of a process's environment (bytes); [] where it cannot be read."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def marked(name: str, prefix: str) -> set:
    """Processes (not this one) whose environment has `name` set to a value starting with
    `prefix`."""
    needle = f"{name}={prefix}".encode()
    me = os.getpid()
    return {p for p in pids() if p != me and any(v.startswith(needle) for v in environ(p))}


def cwd_of(pid: int):
    """The working directory of a process, or None where it cannot be read."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def scripts_in(folder: Path, *scripts: str) -> list:
    """[(pid, age in seconds)] of the processes running one of `scripts` (a python script's name,
    e.g. "train.py") whose working directory is `folder`, in one pass over the process table."""
    found, names, folder = [], [s.encode() for s in scripts], Path(folder).resolve()
    for pid in pids():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if not any(a == n or a.endswith(b"/" + n) for a in args[:4] for n in names):
            continue
        if cwd_of(pid) != folder:
            continue  # another repository's, or not ours to read
        age = process_age(pid)
        if age is not None and running(pid):
            found.append((pid, age))
    return found


def end_processes(targets, grace: float = KILL_GRACE_S) -> list:
    """SIGTERM every process (train.py writes its crash summary, git removes its lock), SIGKILL
    those left after `grace` seconds, and wait until they are gone. Returns the pids that needed
    SIGKILL."""
    targets = {p for p in targets if p != os.getpid()}
    _signal_all(targets, signal.SIGTERM)
    left = _wait_gone(targets, grace)
    if left:
        _signal_all(left, signal.SIGKILL)
        _wait_gone(left, grace)
    return sorted(left)


def _signal_all(targets, sig):
    for p in targets:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass  # already gone


def _wait_gone(targets, seconds: float) -> set:
    """Wait up to `seconds` for the processes to end; the ones still alive."""
    deadline = time.monotonic() + seconds
    while True:
        for p in targets:
            try:
                # reap our own children; others are reaped by their parents
                os.waitpid(p, os.WNOHANG)
            except ChildProcessError:
                pass  # not our child
        targets = {p for p in targets if running(p)}
        if not targets or time.monotonic() >= deadline:
            return targets
        time.sleep(WAIT_POLL_S)


def terminate(child, also=()) -> list:
    """End a child (a subprocess.Popen), everything below it (collected before anything is
    signalled) and `also`; returns the pids that needed SIGKILL."""
    killed = end_processes(descendants(child.pid) | {child.pid} | set(also))
    child.wait()
    return killed


def hold_life(path: Path):
    """Hold `path` locked (flock) for as long as this process lives; the kernel releases it when
    the process ends, however it ends (SIGKILL too). Other processes ask with `life_held`, also from
    another PID namespace (the agent's box), where this process's pid means nothing, and a reused
    pid cannot fake it. Returns the open file: keep it."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    held = open(path, "a")  # not inherited by children (Python's default): they do not hold it
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return held


def life_held(path: Path) -> bool:
    """Whether a live process holds `path` with hold_life."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def prctl(option: int, value: int):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}, {value}) failed")


def undumpable():
    """This process's memory (where the API key is) closed to other processes of its user: no
    ptrace, no /proc/<pid>/mem or environ, no core dump. A child's exec opens its own again."""
    prctl(PR_SET_DUMPABLE, 0)


def dies_with_parent(sig: int):
    """A preexec_fn: the child gets `sig` when the process that started it dies, however it dies
    (SIGKILL, the OOM killer)."""
    return lambda: prctl(PR_SET_PDEATHSIG, sig)
