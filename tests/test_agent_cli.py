"""The agent CLIs' parts that need no CLI: which model a command names, where the night's provider
goes in Codex's command line, how Codex's JSON events read in supervisor.log, and how a session
that ends without a run is counted (a Codex that stops to ask is resumed, not a bad start)."""

import io
import time
from types import SimpleNamespace

import pytest

from night import claude, codex, sessions


def test_the_model_a_claude_command_names_else_its_variable_else_the_default():
    assert claude.model_of(["claude", "-p", "--model", "claude-opus-4-1"], {}) == "claude-opus-4-1"
    assert claude.model_of(["claude", "--model=sonnet", "-p"], {}) == "sonnet"
    assert claude.model_of(["claude", "-p"], {"ANTHROPIC_MODEL": "haiku"}) == "haiku"
    assert claude.model_of(["claude", "-p"], {}) == "(its configured model)"


def test_the_model_a_codex_command_names_else_its_config_else_the_default(tmp_path):
    home = {"CODEX_HOME": str(tmp_path)}
    assert codex.model_of(["codex", "exec", "-m", "gpt-5-codex"], home) == "gpt-5-codex"
    assert codex.model_of(["codex", "exec", "-c", 'model="o3"'], home) == "o3"
    assert codex.model_of(["codex", "exec"], home) == "(its configured model)"
    (tmp_path / "config.toml").write_text('model = "gpt-5.1"\n[features]\nx = true\n')
    assert codex.model_of(["codex", "exec"], home) == "gpt-5.1"
    (tmp_path / "config.toml").write_text("model = [unclosed\n")
    with pytest.raises(ValueError, match="config.toml is not valid TOML .*-m in --codex-command"):
        codex.model_of(["codex", "exec"], home)


def test_the_nights_provider_comes_right_after_exec_so_the_users_options_refine_it():
    command = ["codex", "exec", "--json", "-c", "model_providers.alr-night.request_max_retries=0"]
    assert codex.with_provider(command, "http://127.0.0.1:9/") == [
        "codex", "exec",
        "-c", 'model_provider="alr-night"',
        "-c", 'model_providers.alr-night={name="the night\'s key proxy", '
              'base_url="http://127.0.0.1:9/", env_key="OPENAI_API_KEY", wire_api="responses"}',
        "--json", "-c", "model_providers.alr-night.request_max_retries=0"]


class Night:
    """What a SessionLog and SessionFailures use of the supervisor: its log, status and stop."""

    def __init__(self, max_outage_hours=1.0):
        self.lines, self.statuses, self.stopping, self.failed = [], [], None, False
        self.args = SimpleNamespace(max_outage_hours=max_outage_hours)

    def write_log(self, text):
        self.lines.append(text)

    def status(self, text):
        self.statuses.append(text)

    def stop(self, reason, failed=False):
        self.stopping, self.failed = reason, failed


EVENTS = """{"type":"thread.started","thread_id":"t-1"}
{"type":"item.completed","item":{"id":"item_0","type":"error","message":"Model metadata for `gpt-test` not found."}}
{"type":"turn.started"}
{"type":"item.started","item":{"id":"item_1","type":"command_execution","command":"/bin/bash -lc 'uv run launch.py'","aggregated_output":"","exit_code":null,"status":"in_progress"}}
{"type":"item.completed","item":{"id":"item_1","type":"command_execution","command":"/bin/bash -lc 'uv run launch.py'","aggregated_output":"val_bpb 1.23\\n","exit_code":0,"status":"completed"}}
{"type":"item.completed","item":{"id":"item_2","type":"command_execution","command":"false","aggregated_output":"","exit_code":1,"status":"failed"}}
{"type":"item.completed","item":{"id":"item_3","type":"file_change","changes":[{"path":"train.py","kind":"update"}],"status":"completed"}}
{"type":"item.completed","item":{"id":"item_4","type":"agent_message","text":"Kept.\\nShall I continue?"}}
{"type":"turn.completed","usage":{"input_tokens":40,"output_tokens":20}}
not json: a line of the CLI's own
"""


def read_events(text):
    night = Night()
    log = codex.CodexLog(night, io.StringIO(text))
    log.thread.join(timeout=30)
    return night, log


def test_codex_events_read_as_one_line_per_message_command_and_output():
    night, log = read_events(EVENTS)
    assert night.lines == [
        "[codex] session t-1",
        "[codex warning] Model metadata for `gpt-test` not found.",
        "[command] /bin/bash -lc 'uv run launch.py'",
        "[result] val_bpb 1.23\n",
        "[result ERROR (exit 1)] ",
        "[file change] update train.py",
        "[assistant] Kept.\nShall I continue?",
        "[codex turn completed] 40 input, 20 output tokens",
        "not json: a line of the CLI's own",
    ]
    assert log.answered and log.api_retry is None and log.last_error is None
    assert log.last_line == "not json: a line of the CLI's own"


def test_codex_retrying_the_api_is_an_outage_with_its_last_error():
    night, log = read_events(
        '{"type":"error","message":"Reconnecting... 1/1 (high demand)"}\n'
        '{"type":"error","message":"high demand"}\n'
        '{"type":"turn.failed","error":{"message":"high demand"}}\n')
    assert night.lines == ["[codex] API error: Reconnecting... 1/1 (high demand)",
                           "[codex] API error: high demand", "[codex turn failed] high demand"]
    assert log.api_retry == "Reconnecting... 1/1 (high demand)"
    assert log.last_error == "high demand" and not log.answered


def ended(answered=False, api_retry=None, last_line=None):
    return SimpleNamespace(answered=answered, api_retry=api_retry, last_error=None,
                           last_line=last_line)


def test_a_codex_session_that_stops_to_ask_is_a_failure_resumed_not_a_bad_start():
    night, failures = Night(), sessions.SessionFailures(0.5, codex.CODEX)
    t0 = time.time()
    for _ in range(sessions.MAX_QUICK_EXITS + 1):  # quick sessions that reached the model
        failures.record(night, 0, ended(answered=True, last_line="Shall I continue?"), t0, 5.0,
                        new_run=False)
    assert night.stopping is None and failures.quick_exits == 0
    assert failures.count == sessions.MAX_QUICK_EXITS + 1
    assert night.statuses[-1] == (
        f"codex stopping without an experiment since {time.strftime('%H:%M', time.localtime(t0))}"
        f" ({sessions.MAX_QUICK_EXITS + 1} failed sessions); last error: Shall I continue?; "
        f"retrying in 0 s")
    # a long clean session without a run is a failure for codex, a good session for claude
    failures.record(night, 0, ended(answered=True), t0, 3600.0, new_run=False)
    assert failures.count == sessions.MAX_QUICK_EXITS + 2
    claude_failures = sessions.SessionFailures(0.5, claude.CLAUDE)
    claude_failures.record(night, 0, ended(answered=True), t0, 3600.0, new_run=False)
    assert claude_failures.count == 0
    # a session with a run resets the count
    failures.record(night, 0, ended(answered=True), t0, 5.0, new_run=True)
    assert failures.count == 0


def test_quick_codex_exits_that_never_reached_the_model_stop_the_night():
    night, failures = Night(), sessions.SessionFailures(0.5, codex.CODEX)
    for _ in range(sessions.MAX_QUICK_EXITS):
        failures.record(night, 1, ended(last_line="error: bad option"), time.time(), 1.0,
                        new_run=False)
    assert night.failed and night.stopping == (
        "codex exited 5 times in a row within 60 s without an experiment (last exit code 1): "
        "error: bad option")


def test_the_codex_cli_gets_its_home_and_the_nights_token_and_no_other_credential(monkeypatch):
    monkeypatch.setenv("CODEX_HOME", "/somewhere/codex")
    monkeypatch.setenv("CODEX_API_KEY", "sk-codex-credential")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-credential")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-credential")
    sup = SimpleNamespace(args=SimpleNamespace(pass_env=set()), night="n-1", agent="codex m")
    proxy = SimpleNamespace(token="alr-night-token")
    env = codex.codex_environment(sup, proxy)
    assert (env["CODEX_HOME"], env["OPENAI_API_KEY"]) == ("/somewhere/codex", "alr-night-token")
    assert (env["AUTORESEARCH_NIGHT"], env["AUTORESEARCH_AGENT"]) == ("n-1", "codex m")
    assert not [v for v in env.values() if "credential" in v]
    assert "OPENAI_API_KEY" not in codex.codex_environment(sup)  # no key: the CLI's own login
