"""A night with the claude backend as real clients behave, on a scripted stand-in `claude`: what the CLI
is started with (tool timeout, allowlisted environment, root), outages, stop rules in the middle of an
experiment, the processes of the night, a supervisor killed or hung up on, a corrupt ledger, and the
stream-json record. The real Claude Code CLI drives a night in test_claude_code.py."""

import json
import os
import re
import signal
import subprocess
import sys
import shlex
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

from harness import proc as processes, settings
from night import claude, supervisor, watch
from analysis.store import Store
from conftest import ROOT
from fake_api import StreamingMessagesAPI
from repos import GIT_ENV, HARNESS, analyze, git, make_repo

SECRET = "sk-ant-test-NIGHT-7d1e0b"

# The stand-in: session n follows plan[n - 1] (the last entry repeats). Steps: {"print": line},
# {"sh": command}, {"sleep": s}, {"exit": code}. It records its stdin and environment per session.
STAND_IN = f"""#!{sys.executable}
import json, os, subprocess, sys, time
calls = os.environ["CALLS"]
n_path = os.path.join(calls, "n")
n = int(open(n_path).read()) + 1 if os.path.exists(n_path) else 1
open(n_path, "w").write(str(n))
open(os.path.join(calls, f"stdin.{{n}}"), "w").write(sys.stdin.read())
json.dump(dict(os.environ), open(os.path.join(calls, f"env.{{n}}"), "w"))
json.dump(sys.argv[1:], open(os.path.join(calls, f"argv.{{n}}"), "w"))
if os.environ.get("ANTHROPIC_BASE_URL"):  # what the CLI does first: ask its API, with its key
    import urllib.error, urllib.request
    ask = urllib.request.Request(os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages", data=b"{{}}",
                                 headers={{"x-api-key": os.environ.get("ANTHROPIC_API_KEY", "")}})
    try:
        answer = str(urllib.request.urlopen(ask, timeout=60).status)
    except urllib.error.HTTPError as e:
        answer = str(e.code)
    open(os.path.join(calls, f"api.{{n}}"), "w").write(answer)
plan = json.load(open(os.environ["PLAN"]))
for step in plan[min(n, len(plan)) - 1]:
    if "print" in step:
        print(step["print"], flush=True)
    elif "sh" in step:
        subprocess.run(step["sh"], shell=True)
    elif "sleep" in step:
        time.sleep(step["sleep"])
    elif "exit" in step:
        sys.exit(step["exit"])
"""

# A finished run of the committed train.py, as train.py leaves it, then analyze.py: one ledger row.
MAKE_RUN = f"""#!{sys.executable}
import subprocess, sys
sys.path[:0] = [{str(ROOT / "tests")!r}, {str(ROOT)!r}]
import synthetic
from pathlib import Path
from repos import head, train_sha
repo = Path.cwd()
val = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
records = synthetic.make_records(n_steps=50)
summary = synthetic.make_summary(records, val, commit=head(repo), train_sha256=train_sha(repo))
synthetic.write_run(repo, records, summary, f"val_bpb: {{val}}\\n")
subprocess.run([sys.executable, "analyze.py"], check=True)
"""


def api_retry(attempt):
    return {"print": json.dumps({"type": "system", "subtype": "api_retry", "attempt": attempt, "max_retries": 10,
                                 "retry_delay_ms": 500, "error_status": 500, "error": "server_error"})}


@pytest.fixture
def night(tmp_path, accept_synthetic):
    repo = make_repo(tmp_path / "repo", HARNESS + ("supervise.py", "program.md"))
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    (bin_dir / "claude").write_text(STAND_IN)
    (bin_dir / "claude").chmod(0o755)
    (bin_dir / "make_run").write_text(MAKE_RUN)
    (bin_dir / "make_run").chmod(0o755)

    def start(plan, *args, env=None, python=sys.executable, boxed=False):
        (calls / "plan.json").write_text(json.dumps(plan))
        full_env = {**os.environ, **GIT_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(calls),
                    "PLAN": str(calls / "plan.json"), "IS_SANDBOX": "1", **(env or {})}
        # unboxed unless `boxed`: the stand-in and its records live outside the repository (the box:
        # test_sandbox.py)
        box = [] if boxed else ["--no-sandbox"]
        return subprocess.Popen([python, "supervise.py", "--backend", "claude", "--pass-env", "CALLS,PLAN",
                                 "--restart-delay", "0", *box, *args], cwd=repo, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=full_env)
    return repo, calls, start


def status_lines(repo):
    return (repo / ".auto-log-research" / "status.log").read_text().splitlines()


def wait_for(predicate, what, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_cli_gets_a_tool_timeout_above_the_training_limit_and_only_the_allowlisted_environment(night):
    repo, calls, start = night
    api = StreamingMessagesAPI([])
    try:
        proc = start([[{"exit": 0}]], "--train-timeout", "1500", "--pass-env", "CALLS,PLAN,MY_VISIBLE",
                     env={"AWS_SECRET_ACCESS_KEY": "aws-secret", "HF_TOKEN": "hf-secret",
                          "SSH_AUTH_SOCK": "/tmp/agent.sock", "GITHUB_TOKEN": "gh-secret", "MY_VISIBLE": "yes",
                          "ANTHROPIC_API_KEY": SECRET, "ANTHROPIC_AUTH_TOKEN": "auth-secret",
                          "ANTHROPIC_BASE_URL": api.url})
        out, _ = proc.communicate(timeout=120)
    finally:
        api.close()
    env = json.loads((calls / "env.1").read_text())
    assert env["BASH_DEFAULT_TIMEOUT_MS"] == env["BASH_MAX_TIMEOUT_MS"] == str((1500 + 600) * 1000)
    for name in ("AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "SSH_AUTH_SOCK", "GITHUB_TOKEN"):
        assert name not in env, name
    assert env["MY_VISIBLE"] == "yes" and env["PATH"].startswith(str(calls.parent / "bin"))
    # the key: not in the environment the CLI (and so every command of the agent) has; the CLI has a token of
    # the night and the night's key proxy as its API, which puts the key in the token's place
    assert SECRET not in json.dumps(env) and "auth-secret" not in json.dumps(env)
    assert env["ANTHROPIC_API_KEY"].startswith("alr-night-") and env["ANTHROPIC_BASE_URL"] != api.url
    assert (calls / "api.1").read_text() == "200" and api.keys == {SECRET}
    assert json.loads((calls / "argv.1").read_text()) == shlex.split(claude.DEFAULT_CLAUDE_COMMAND)[1:]
    with pytest.raises(OSError):  # the token is worth nothing once its night is over
        urllib.request.urlopen(env["ANTHROPIC_BASE_URL"], timeout=60)
    assert env[settings.NIGHT_ENV].startswith(f"{proc.pid}-")
    assert proc.returncode == 1, out  # five quick exits without an experiment: a failed night


def test_the_agent_and_model_of_the_session_reach_the_agents_and_the_harnesss_commands(monkeypatch):
    from night import environment
    monkeypatch.delenv(settings.AGENT_ENV, raising=False)
    for make in (environment.agent_environment, environment.harness_environment):
        assert make(night="n1", agent="codex gpt-test")[settings.AGENT_ENV] == "codex gpt-test"
        assert settings.AGENT_ENV not in make(night="n1")  # none given: none set


def test_a_key_file_readable_by_others_is_refused_and_one_of_the_users_own_serves_the_night(night, tmp_path):
    repo, calls, start = night
    key_file = tmp_path / "anthropic-key"
    key_file.write_text(SECRET + "\n")
    key_file.chmod(0o644)
    refused = start([[{"exit": 0}]], "--key-file", str(key_file))
    out, _ = refused.communicate(timeout=120)
    assert refused.returncode == 2
    assert out == (f"error: --key-file {key_file} is readable by other users (mode 644): "
                   f"chmod 600 {key_file}\n")
    assert not (calls / "n").exists()  # no agent started
    key_file.chmod(0o600)
    api = StreamingMessagesAPI([])
    try:
        proc = start([[{"exit": 0}]], "--hours", str(3 / 3600), "--key-file", str(key_file),
                     env={"ANTHROPIC_BASE_URL": api.url})
        proc.communicate(timeout=120)
    finally:
        api.close()
    assert (calls / "api.1").read_text() == "200" and api.keys == {SECRET}
    env = json.loads((calls / "env.1").read_text())
    assert env["ANTHROPIC_API_KEY"].startswith("alr-night-") and SECRET not in json.dumps(env)


def test_the_supervisors_memory_is_closed_to_the_users_other_processes():
    """proc.undumpable, as the supervisor calls it once it has the key: another process of the same
    (non-root) user can no longer read its environment or memory; without it, it can."""
    if os.geteuid() != 0 or not Path("/usr/bin/python3").exists():
        pytest.skip("runs two processes as the user nobody: needs root and /usr/bin/python3")
    folders = [ROOT / "harness", ROOT, *ROOT.parents]
    if any(not f.stat().st_mode & 0o001 for f in folders) or not (ROOT / "harness" / "proc.py").stat().st_mode & 0o004:
        pytest.skip(f"the user nobody cannot read the checkout {ROOT}")
    holder = ("import sys; sys.path.insert(0, sys.argv[1]); from harness import proc\n"
              "if sys.argv[2] == 'closed': proc.undumpable()\n"
              "print('ready', flush=True); sys.stdin.read()")
    reader = ("import sys\n"
              "try: open(f'/proc/{sys.argv[1]}/environ', 'rb').read(); print('read')\n"
              "except PermissionError: print('refused')")
    seen = {}
    for state in ("open", "closed"):
        held = subprocess.Popen(["/usr/bin/python3", "-I", "-c", holder, str(ROOT), state], user=65534, group=65534,
                                extra_groups=[], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert held.stdout.readline() == "ready\n"
            seen[state] = subprocess.run(["/usr/bin/python3", "-I", "-c", reader, str(held.pid)], user=65534,
                                         group=65534, extra_groups=[], capture_output=True, text=True).stdout
        finally:
            held.stdin.close()
            held.wait()
    assert seen == {"open": "read\n", "closed": "refused\n"}


def test_a_night_that_cannot_box_its_agent_says_so_once_and_runs_it_unboxed(night, tmp_path):
    repo, calls, start = night
    fake = tmp_path / "no-userns"
    fake.mkdir()
    (fake / "bwrap").write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\n"
                                "exit 1\n")
    (fake / "bwrap").chmod(0o755)
    path = f"{fake}{os.pathsep}{calls.parent / 'bin'}{os.pathsep}{os.environ['PATH']}"
    proc = start([[{"exit": 0}]], "--hours", str(3 / 3600), boxed=True, env={"PATH": path})
    out, _ = proc.communicate(timeout=120)
    assert (calls / "n").exists(), out  # the agent ran, unboxed
    lines = status_lines(repo)
    said = [line for line in lines if "UNBOXED" in line]
    assert len(said) == 1 and said[0] == lines[0], lines
    cannot = ("bwrap cannot make a box here (bwrap: No permissions to create new namespace): unprivileged "
              "user namespaces are off (sysctl kernel.unprivileged_userns_clone=1), or run the night in a VM")
    assert f"; agent UNBOXED: {cannot};" in lines[0]
    assert analyze(repo, "report").returncode == 0  # the morning's report says so too
    report = (repo / ".auto-log-research" / "report.html").read_text()
    assert re.search(r"The latest night's agent ran outside its sandbox: \d{4}-\d\d-\d\dT[\d:]+\+0000: "
                     + re.escape(cannot), report), report[:3000]
    proc = start([[{"exit": 0}]], "--max-experiments", "0")  # --no-sandbox
    proc.communicate(timeout=120)
    assert "; agent UNBOXED: --no-sandbox was given" in status_lines(repo)[len(lines)]
    sandbox_log = (repo / ".auto-log-research" / "sandbox.log").read_text().splitlines()
    assert [line.split(" | ", 1)[1] for line in sandbox_log] == [f"UNBOXED: {cannot}",
                                                               "UNBOXED: --no-sandbox was given"]


def test_root_is_refused_before_the_cli_starts(night, monkeypatch):
    really_root = os.geteuid() == 0
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    command = shlex.split(claude.DEFAULT_CLAUDE_COMMAND)
    assert claude.root_refusal(command, {}) == claude.ROOT_REFUSAL
    assert claude.root_refusal(command, {"IS_SANDBOX": "1"}) is None
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert claude.root_refusal(command, {}) is None
    monkeypatch.undo()
    if not really_root:
        pytest.skip("the end-to-end half needs root")
    repo, calls, start = night
    proc = start([[{"exit": 0}]], env={"IS_SANDBOX": ""})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "error: running as root: Claude Code refuses --dangerously-skip-permissions as root" in out
    assert "IS_SANDBOX=1" in status_lines(repo)[-1]
    assert not (calls / "n").exists()  # never started


def test_an_outage_is_backed_off_reported_and_ends_the_night_quoting_the_cli(night):
    repo, calls, start = night
    outage = [api_retry(1), api_retry(2), api_retry(3), {"sleep": 0.5}, {"exit": 1}]
    proc = start([outage], "--max-outage-hours", str(20 / 3600), "--restart-delay", "0.5")  # room for slow sessions
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    lines = status_lines(repo)
    since = [line for line in lines if "API unreachable since" in line and "retrying in" in line]
    assert len(since) >= 2
    delays = [float(line.split("retrying in ")[1].split(" s")[0]) for line in since]
    assert delays == sorted(delays) and delays[-1] > delays[0]  # backed off
    assert "stopped: API unreachable since" in lines[-1]
    assert "API error 500 server_error, retry 3 of 10" in lines[-1]
    assert int((calls / "n").read_text()) >= 3  # longer than quick exits would have allowed with no API contact


def test_the_night_resumes_by_itself_when_the_api_answers_again(night):
    repo, calls, start = night
    outage = [api_retry(1), {"exit": 1}]
    proc = start([outage, outage, [{"sh": "make_run 1.0"}, {"sleep": 30}]], "--max-experiments", "1",
                 "--restart-delay", "0.2", "--stop-grace", "0")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    lines = status_lines(repo)
    assert any("API unreachable since" in line for line in lines)
    assert "stopped: experiment budget used (1 runs)" in lines[-1]


def test_a_stop_rule_lets_the_experiment_finish_before_ending_the_agent(night):
    repo, calls, start = night
    t0 = time.time()
    plan = [[{"sh": "make_run 1.0"}, {"sleep": 4}, {"sh": f"{sys.executable} analyze.py keep"}, {"sleep": 120}]]
    proc = start(plan, "--max-experiments", "1")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert time.time() - t0 < 100  # ended once the keep was done, not after the agent's next 120 s
    rows = Store(repo).read_ledger()
    assert [r["status"] for r in rows] == ["keep"]  # the agent's own keep: the rule waited for it
    assert "settled" not in (repo / ".auto-log-research" / "status.log").read_text()
    assert "stopped: experiment budget used (1 runs)" in status_lines(repo)[-1]


def test_when_the_grace_runs_out_the_supervisor_settles_the_last_run(night):
    repo, calls, start = night
    proc = start([[{"sh": "make_run 1.0"}, {"sh": f"{sys.executable} analyze.py keep"},
                   {"sh": "sed -i 's/^DEPTH = 8 /DEPTH = 9 /' train.py && git commit -qam 'depth 9'"},
                   {"sh": "make_run 1.2"}, {"sleep": 120}]],
                 "--max-experiments", "2", "--stop-grace", "2")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    rows = Store(repo).read_ledger()
    assert [r["status"] for r in rows] == ["keep", "discard"]  # decided by the supervisor, as its verdict said
    text = (repo / ".auto-log-research" / "status.log").read_text()
    assert "stop grace of 2 s used up while run" in text and "settled the last run: analyze.py discard done" in text
    assert "DEPTH = 8 " in (repo / "train.py").read_text()  # back to the best
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""
    assert git(repo, "log", "-1", "--format=%s").startswith("revert to best")


def test_a_module_the_agent_leaves_in_the_repository_does_not_run_in_the_nights_own_commands(night):
    """The night settles the last run and writes the report with the harness's analyze.py, outside
    the agent's box: a json.py the agent left beside it must not shadow the standard library's."""
    repo, calls, start = night
    proc = start([[{"sh": "make_run 1.0"}, {"sh": f"{sys.executable} analyze.py keep"},
                   {"sh": "sed -i 's/^DEPTH = 8 /DEPTH = 9 /' train.py && git commit -qam 'depth 9'"},
                   {"sh": "make_run 1.2"},
                   {"sh": "echo \"open('shadowed', 'w').write('the night ran the agent\\'s json.py')\" > json.py"},
                   {"sleep": 120}]],
                 "--max-experiments", "2", "--stop-grace", "2")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert not (repo / "shadowed").exists()
    assert "settled the last run: analyze.py discard done" in (repo / ".auto-log-research" / "status.log").read_text()
    assert [r["status"] for r in Store(repo).read_ledger()] == ["keep", "discard"]


def start_with_orphan(start, calls):
    """A night whose agent starts a process in a session of its own (as Claude Code runs commands), then waits."""
    proc = start([[{"sh": f"setsid sleep 300 < /dev/null > /dev/null 2>&1 & echo $! > {calls}/orphan.pid"},
                   {"sleep": 300}]])
    wait_for(lambda: (calls / "orphan.pid").exists() and (calls / "orphan.pid").read_text().strip(), "the orphan")
    orphan = int((calls / "orphan.pid").read_text())
    assert alive(orphan)
    return proc, orphan


def test_sighup_ends_every_process_of_the_night_even_in_its_own_session(night):
    repo, calls, start = night
    proc, orphan = start_with_orphan(start, calls)
    proc.send_signal(signal.SIGHUP)  # the terminal closed
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert not alive(orphan)
    assert "stopped: stopped by a signal (SIGHUP)" in status_lines(repo)[-1]
    assert not (repo / ".auto-log-research" / supervisor.PID_FILE).exists()


def test_what_a_killed_supervisor_left_running_is_ended_by_the_next_start(night):
    repo, calls, start = night
    first, orphan = start_with_orphan(start, calls)
    first.kill()  # the OOM killer
    first.communicate(timeout=60)
    assert alive(orphan)
    second = start([[{"exit": 0}]], "--max-experiments", "0")
    out, _ = second.communicate(timeout=120)
    assert not alive(orphan)
    assert any("process(es) an earlier night left running" in line for line in status_lines(repo)), out


def test_a_corrupt_ledger_is_reported_and_the_night_goes_on(night):
    repo, calls, start = night
    proc = start([[{"sh": "make_run 1.0"}, {"sh": "echo '{corrupt' >> .auto-log-research/runs.jsonl"},
                   {"sleep": 300}]], "--hours", str(30 / 3600), "--stop-grace", "0")  # the deadline ends the agent
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    lines = status_lines(repo)
    assert re.search(r"\| started \(pid \d+; stop rules: deadline \d{4}-\d\d-\d\d \d\d:\d\d, ", lines[0]), lines[0]
    assert any("store problem:" in line and "runs.jsonl line 2 is corrupt" in line for line in lines)
    assert "stopped: deadline reached" in lines[-1]


def test_the_record_has_every_tool_call_and_result_redacted(night):
    repo, calls, start = night
    events = [
        {"type": "system", "subtype": "init", "session_id": "s1", "cwd": str(repo), "model": "m"},
        {"type": "assistant", "message": {"content": [{"type": "text", "text": "running the baseline"},
                                                      {"type": "tool_use", "id": "t1", "name": "Bash",
                                                       "input": {"command": "uv run train.py > run.log 2>&1"}}]}},
        {"type": "user", "message": {"content": [{"type": "tool_result", "tool_use_id": "t1",
                                                  "content": f"key is {SECRET}", "is_error": False}]}},
        {"type": "result", "subtype": "success", "is_error": False, "result": "done for now"},
    ]
    proc = start([[{"print": json.dumps(e)} for e in events] + [{"exit": 0}]], "--max-experiments", "0",
                 env={"ANTHROPIC_API_KEY": SECRET})
    proc.communicate(timeout=60)
    proc = start([[{"print": json.dumps(e)} for e in events] + [{"exit": 0}]], "--hours", str(3 / 3600),
                 env={"ANTHROPIC_API_KEY": SECRET})
    proc.communicate(timeout=60)
    log = (repo / ".auto-log-research" / "supervisor.log").read_text()
    assert "[assistant] running the baseline\n" in log
    assert '[tool Bash] {"command": "uv run train.py > run.log 2>&1"}\n' in log
    assert "[result] key is [redacted]\n" in log
    assert "[claude result success] done for now\n" in log
    assert SECRET not in log
    for name in ("supervisor.log", "status.log"):
        assert (repo / ".auto-log-research" / name).stat().st_mode & 0o077 == 0, name  # owner only


def test_a_second_night_in_the_same_repository_is_refused(night):
    repo, calls, start = night
    first = start([[{"sleep": 300}]])
    wait_for(lambda: (calls / "n").exists(), "the first night's agent")
    second = start([[{"exit": 0}]])
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 2
    assert f"a night is already running in this repository (supervise.py pid {first.pid})" in out
    assert first.poll() is None  # untouched
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=120)
    assert first.returncode == 130


def test_a_training_run_is_aged_from_its_own_start(night, tmp_path):
    repo, calls, start = night
    run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "train.py"], cwd=repo)
    try:
        wait_for(lambda: processes.scripts_in(repo, "train.py"), "the run to show")
        [(pid, age)] = processes.scripts_in(repo, "train.py")
        assert pid == run.pid and 0 <= age < 30
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        assert processes.scripts_in(elsewhere, "train.py") == []  # another repository's run is not ours
    finally:
        run.kill()
        run.wait()
    assert processes.scripts_in(repo, "train.py") == []


def test_the_keep_policy_is_the_one_the_night_started_with(night):
    """The agent cannot change the night's keep policy: an analyze.py run under another
    AUTORESEARCH_VERDICT judges with the policy the night fixed at its start, says so, and records it."""
    repo, calls, start = night
    gain = "AUTORESEARCH_VERDICT=gain"
    proc = start([[{"sh": "make_run 1.0"}, {"sh": f"{sys.executable} analyze.py keep"},
                   {"sh": f"{gain} {sys.executable} analyze.py status > {calls}/status.out 2>&1"},
                   {"sh": "sed -i 's/^DEPTH = 8 /DEPTH = 9 /' train.py && git commit -qam 'depth 9'"},
                   {"sh": f"{gain} make_run 0.99 > {calls}/analyze.out 2>&1"},
                   {"sleep": 120}]],
                 "--max-experiments", "2", "--stop-grace", "2")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "AUTORESEARCH_VERDICT" not in json.loads((calls / "env.1").read_text())  # the agent's own
    said = (calls / "analyze.out").read_text()
    assert "note: AUTORESEARCH_VERDICT=gain is ignored: the night running here (supervise.py pid " in said
    assert "fixed the keep policy paired when it started" in said
    rows = Store(repo).read_ledger()
    assert rows[-1]["verdict_mode"] == "paired" and rows[-1]["delta_best"] is not None
    assert "verdict mode: paired" in (calls / "status.out").read_text()
    assert not (repo / ".auto-log-research" / "night.json").exists()  # the night is over: nothing is fixed now


def test_a_hung_run_is_recorded_timeout_by_its_watchdog_not_killed_by_the_night(prepared, night):
    """The one ordering of limits at work: a run that hangs is ended by the harness's watchdog, which
    writes its `timeout` summary, long before the night's own kill (watchdog + 120 s) would fire."""
    repo, calls, start = night
    source = (repo / "train.py").read_text()
    hang = "    run.log_step(record)\n"
    assert hang in source
    (repo / "train.py").write_text(source.replace(hang, hang + "    if step == 2:\n        time.sleep(3600)\n", 1))
    git(repo, "commit", "-qam", "a hang at step 2")
    train = f"{sys.executable} launch.py; {sys.executable} analyze.py"
    proc = start([[{"sh": train}, {"sleep": 300}]], "--max-experiments", "1",
                 env={"AUTORESEARCH_WATCHDOG_S": "20", "AUTORESEARCH_TIME_BUDGET": "60"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    [row] = Store(repo).read_ledger()
    assert row["status"] == "timeout" and "watchdog: run exceeded 20s of wall time" in row["error"], row
    text = (repo / ".auto-log-research" / "status.log").read_text()
    assert "killed a training run" not in text and "stopped: experiment budget used (1 runs)" in text


# ---------------------------------------------------------------------------
# The watch over the fixed files (night/watch.py): a checker the agent's edits do not run
# ---------------------------------------------------------------------------

def assert_stopped_on_tampering(repo, proc, named):
    try:
        out, _ = proc.communicate(timeout=120)  # the agent sleeps 300 s: only the watch ends it in time
    except subprocess.TimeoutExpired:
        proc.terminate()  # the supervisor ends its agent on SIGTERM: nothing is left running
        proc.communicate(timeout=120)
        raise
    assert proc.returncode == 1, out
    line = f"TAMPERING: {named}:"
    assert any(line in entry for entry in status_lines(repo)), status_lines(repo)
    assert "the last run is not settled: fixed files changed during the night" in out
    assert f"stopped: {line}" in status_lines(repo)[-1]
    assert line in (repo / ".auto-log-research" / "tampering.log").read_text()
    status = subprocess.run([sys.executable, "analyze.py", "status"], cwd=repo, capture_output=True, text=True)
    assert line in status.stdout.splitlines()[0], status.stdout + status.stderr
    report = (repo / ".auto-log-research" / "report.html").read_text()  # written at the night's end
    assert re.search(rf'<div class="tampering">[^<]* \| {re.escape(line)}', report)


def test_a_committed_return_in_the_integrity_check_stops_the_night(night):
    repo, calls, start = night
    silence = "sed -i 's/^    repo_root = Path(repo_root)$/    return []/' analysis/integrity.py"
    proc = start([[{"sh": "make_run 1.0"}, {"sh": f"{sys.executable} analyze.py keep"},
                   {"sh": f"{silence} && git commit -qam 'faster analysis'"}, {"sleep": 300}]])
    assert_stopped_on_tampering(repo, proc, "analysis/integrity.py was changed since the night started")
    assert "    return []\n" in (repo / "analysis" / "integrity.py").read_text()  # the edit was real
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""  # and committed


def test_a_pth_file_planted_in_the_environment_stops_the_night(night, tmp_path):
    """A real virtual environment for the night (its site-packages reach the project's through a path
    line of a .pth, as the night's own `uv run` environment would hold them); the agent plants a .pth
    whose import line every later Python of that environment runs before the harness."""
    repo, calls, start = night
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site_packages = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    (site_packages / "project.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    planted, ran = site_packages / "faster.pth", calls / "pth-ran"
    hook = f"import pathlib; pathlib.Path({str(ran)!r}).touch()"
    proc = start([[{"sh": "make_run 1.0"}, {"sh": f"echo {shlex.quote(hook)} > {planted}"}, {"sleep": 300}]],
                 python=python)
    assert_stopped_on_tampering(repo, proc, f"{planted} appeared since the night started")
    ran.unlink()
    subprocess.run([python, "-c", "pass"], check=True)
    assert ran.exists()  # the attack is real: every start of that environment's Python runs the hook


def test_the_watch_names_every_changed_fixed_file_and_startup_hook(tmp_path):
    """Without a night: a snapshot, then real edits; each file is one line naming it, and nothing else
    (train.py, the store, honest bytecode) is an alarm."""
    repo = make_repo(tmp_path / "repo", HARNESS + ("supervise.py", "program.md"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site_packages = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    watched = watch.FixedWatch(repo, [str(site_packages)])
    (repo / "train.py").write_text((repo / "train.py").read_text() + "# the agent's file\n")
    (repo / ".auto-log-research").mkdir()
    (repo / ".auto-log-research" / "runs.jsonl").write_text("{}\n")
    assert watched.changes() == []
    (site_packages / "sitecustomize.py").write_text("import os\n")
    with open(repo / "harness" / "metric.py", "a") as f:
        f.write("# edited\n")
    (repo / "night" / "rules.py").unlink()
    found = watched.changes()
    assert [line.split(" since the night started")[0] for line in found] == [
        f"{site_packages / 'sitecustomize.py'} appeared", "harness/metric.py was changed", "night/rules.py was removed"]

