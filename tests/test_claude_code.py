"""The real Claude Code CLI (npm @anthropic-ai/claude-code) drives a night through `supervise.py
--backend claude`, against a local fake Messages API that streams scripted tool calls the way the real
API does (server-sent events). The night: the baseline, a discarded experiment, an outage in between
(the CLI retries, fails, the supervisor backs off and resumes), and a second experiment during which
the experiment budget runs out, so the stop rule must let it finish. Every training run is real (a
tiny budget) and outlasts the CLI's Bash timeout as set in the environment (2 s here): the supervisor
raises it above --train-timeout. The night runs as root (CI's user) and as the non-root user nobody.
Skipped with a reason where the CLI is not installed; .ci/run installs it."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from harness import box, contract, proc as processes, settings
from analysis.store import Store
from conftest import ROOT
from fake_api import StreamingMessagesAPI, outage
from repos import GIT_ENV, HARNESS, git, make_repo

SECRET = "sk-ant-test-REAL-CLI-1b2c3d"
NOBODY = 65534
# a non-root user cannot run an interpreter under /root (where this venv's may live): the night of
# nobody's runs the system's, of the same minor version, with this venv's packages
SYSTEM_PYTHON = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
CLAUDE = shutil.which("claude")
pytestmark = pytest.mark.skipif(CLAUDE is None, reason="Claude Code CLI not installed "
                                "(npm install -g @anthropic-ai/claude-code; .ci/run does it where npm exists)")

def bash(command):
    return [{"type": "tool_use", "name": "Bash", "input": {"command": command, "description": "run a step"}}]


def say(text):
    return [{"type": "text", "text": text}]



# Run from the agent's shell: every environment, command line and readable memory of the processes it can see
# (the CLI's too), and every file under /tmp, $HOME (the CLI's config and transcripts) and the store, searched
# for the key. The key is put together here at run time (the probe's own process is skipped), so that no
# command line, transcript or memory holds it because of the probe; the night's token is counted too.
PROBE = r"""
import os, sys
needle = ('sk-ant-test-' + 'REAL-CLI-1b2c3d').encode()
token = os.environ.get('ANTHROPIC_API_KEY', '').encode()
found, token_seen, pids = [], 0, 0
def search(what, data):
    global token_seen
    if needle in data:
        found.append(what)
    token_seen += bool(token) and token in data
for name in os.listdir('/proc'):
    if not name.isdigit() or int(name) == os.getpid():
        continue
    pids += 1
    for part in ('environ', 'cmdline'):
        try:
            search(f'{part} of {name}', open(f'/proc/{name}/{part}', 'rb').read())
        except OSError:
            pass
    try:
        maps = open(f'/proc/{name}/maps').read().splitlines()
        with open(f'/proc/{name}/mem', 'rb') as mem:
            for line in maps:
                span, perms = line.split()[:2]
                start, end = (int(x, 16) for x in span.split('-'))
                if 'r' in perms and end - start <= 256 << 20:
                    try:
                        mem.seek(start)
                        search(f'memory of {name}', mem.read(end - start))
                    except (OSError, ValueError, OverflowError):
                        pass
    except OSError:
        pass
for top in ('/tmp', os.environ['HOME'], '.auto-log-research'):
    for folder, _, files in os.walk(top):
        for file in files:
            try:
                search(os.path.join(folder, file), open(os.path.join(folder, file), 'rb').read())
            except OSError:
                pass
print(f'probe: {pids} processes; key found in {found}; token seen {token_seen > 0}')
"""


def night_script(python):
    py = shlex.quote(python)
    train = f"{py} launch.py; {py} analyze.py"
    return [
        # session 1, program.md: the baseline, kept, and the ideas queue
        bash(f"{train} && {py} analyze.py keep"),
        bash("printf '# Ideas queue\\n1. a higher Muon lr\\n2. deeper\\n' > .auto-log-research/notes/ideas_queue.md"),
        bash(f"{py} .auto-log-research/probe.py"),
        # in the box (where bubblewrap works), the harness and the ledger are read-only to the agent's shell
        bash("touch harness/probe.py .auto-log-research/runs.jsonl 2>&1 | sed 's/^/box: /'"),
        say("baseline kept; stopping here for now"),
        # the API goes down: the CLI retries once (CLAUDE_CODE_MAX_RETRIES=1) and gives up, twice
        outage(4),
        # a later session: experiment 1, discarded
        bash("sed -i 's/^MATRIX_LR = 0.04 /MATRIX_LR = 0.4 /' train.py && git commit -qam 'matrix lr 0.4'"),
        bash(f"{train} && {py} analyze.py discard"),
        say("discarded"),
        # experiment 2: the budget (3 runs) runs out when its row lands; the agent still discards it
        bash("sed -i 's/^DEPTH = 8 /DEPTH = 9 /' train.py && git commit -qam 'depth 9'"),
        bash(train),
        bash(f"sleep 3; {py} analyze.py discard"),
        say("discarded; next idea"),
        bash("sleep 600"),  # what would come next: the supervisor has ended the agent before
    ]


@pytest.fixture(params=["root", "nobody"])
def night_of(request, tmp_path, prepared, monkeypatch):
    """(the repository, the uid the night runs as, its interpreter, its environment): as this
    test's user (root in CI: IS_SANDBOX=1, as README says), or as the non-root user nobody, with a
    repository, home, prepare cache and interpreter of its own in a folder it can reach."""
    files = HARNESS + ("supervise.py", "program.md")
    if request.param == "root":
        home = tmp_path / "home"
        home.mkdir()
        yield (make_repo(tmp_path / "repo", files), None, sys.executable,
               {"HOME": str(home), "IS_SANDBOX": "1"})
        return
    if os.geteuid() != 0:
        pytest.skip("switching to the user nobody needs root")
    packages = sysconfig.get_paths()["purelib"]
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip(f"the night of nobody's runs {SYSTEM_PYTHON}, which is missing")
    if subprocess.run([SYSTEM_PYTHON, "-c", "import os, sys; sys.exit(not os.access(sys.argv[1], "
                       "os.R_OK | os.X_OK))", packages], user=NOBODY).returncode:
        pytest.skip(f"the user nobody cannot read this venv's packages ({packages})")
    top = Path(tempfile.mkdtemp(prefix="alr-nobody-"))
    top.chmod(0o755)
    venv = top / "venv"  # the system's interpreter with this venv's packages
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(SYSTEM_PYTHON)
    (venv / "lib" / Path(packages).parent.name).mkdir(parents=True)
    (venv / "lib" / Path(packages).parent.name / "site-packages").symlink_to(packages)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\n")
    cache = shutil.copytree(settings.CACHE_DIR, top / "cache",
                            ignore=shutil.ignore_patterns(contract.SEALS_DIR))
    (top / "home").mkdir()
    repo = make_repo(top / "repo", files)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(cache), str(top / "home"), str(repo)],
                   check=True)
    # this test, as root, reads nobody's repository afterwards: git would refuse to
    for name, value in {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory",
                        "GIT_CONFIG_VALUE_0": str(repo)}.items():
        monkeypatch.setenv(name, value)
    yield (repo, NOBODY, str(venv / "bin" / "python"),
           {"HOME": str(top / "home"), "AUTORESEARCH_CACHE": str(cache), "USER": "nobody"})
    shutil.rmtree(top)


def test_real_claude_code_drives_a_night_through_an_outage_and_a_stop_rule(night_of):
    repo, uid, python, user_env = night_of
    api = StreamingMessagesAPI(night_script(python))
    (repo / ".auto-log-research").mkdir(mode=0o700)
    (repo / ".auto-log-research" / "probe.py").write_text(PROBE)
    if uid is not None:
        shutil.chown(repo / ".auto-log-research", uid, uid)
        shutil.chown(repo / ".auto-log-research" / "probe.py", uid, uid)
    env = {**os.environ, **GIT_ENV, "ANTHROPIC_API_KEY": SECRET, "ANTHROPIC_BASE_URL": api.url,
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_MAX_RETRIES": "1",
           "BASH_DEFAULT_TIMEOUT_MS": "2000", "BASH_MAX_TIMEOUT_MS": "2000",  # a default no training run survives
           "AUTORESEARCH_TIME_BUDGET": "3", **user_env}
    try:
        proc = subprocess.run([python, "supervise.py", "--backend", "claude", "--max-experiments", "3",
                               "--restart-delay", "0.5", "--train-timeout", "700"], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=900, user=uid, group=uid,
                              extra_groups=[] if uid is not None else None)
    finally:
        api.close()
    store = repo / ".auto-log-research"
    log = (store / "supervisor.log").read_text()
    assert proc.returncode == 0, proc.stdout + log[-4000:]
    assert (store / "supervisor.log").stat().st_uid == (os.geteuid() if uid is None else uid)
    # the ledger and git agree: baseline kept, both experiments discarded and reverted
    rows = Store(repo).read_ledger()
    assert [r["status"] for r in rows] == ["keep", "discard", "discard"], proc.stdout
    assert all(r["status"] != "crash" for r in rows)  # no run was cut by the CLI's 2 s Bash timeout
    assert {r["agent"] for r in rows} == {"claude (its configured model)"}  # no --model given
    base = rows[0]["commit"]
    subjects = git(repo, "log", "--format=%s").splitlines()
    assert subjects == [f"revert to best {base}", "depth 9", f"revert to best {base}", "matrix lr 0.4", "baseline"]
    assert (repo / "train.py").read_text() == (ROOT / "train.py").read_text()
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""
    # the outage was seen, waited out, and the night went on
    assert api.failures_sent == 4
    status = (store / "status.log").read_text()
    assert "API unreachable since" in status
    assert status.strip().splitlines()[-1].split(" | ")[1] == "stopped: experiment budget used (3 runs)"
    assert "settled" not in status  # the agent finished its own experiment within the grace
    # the record: every command the agent ran, and no key anywhere
    assert log.count("[tool Bash]") >= 7 and "launch.py; " in log and "[result]" in log
    assert api.keys == {SECRET}  # the API got the key, from the night's key proxy ...
    # ... which the CLI reached with the night's token: the key is nowhere the agent's shell can look
    probe = re.search(r"\[result\] probe: (\d+) processes; key found in (.*); token seen (\w+)", log)
    assert probe and int(probe[1]) >= 2 and probe[3] == "True", log[-4000:]
    if box.unavailable() is None:  # unboxed, the agent would see this test's own process, which has the key
        assert probe[2] == "[]", probe[0]
    if box.unavailable() is None:  # the night boxed its agent: the harness and the ledger are read-only to it
        assert ("[result] box: touch: cannot touch 'harness/probe.py': Read-only file system\n"
                "box: touch: cannot touch '.auto-log-research/runs.jsonl': Read-only file system\n") in log
        assert (store / "sandbox.log").read_text().endswith(" | boxed (bubblewrap; network: the API only)\n")
    for path in repo.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            assert SECRET.encode() not in path.read_bytes(), path
    assert processes.scripts_in(repo, "train.py") == []
    assert [p for p in processes.marked(settings.NIGHT_ENV, "") if cwd_of(p).startswith(str(repo))] == []  # nothing left running


def cwd_of(pid):
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""  # gone
