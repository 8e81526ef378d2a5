"""
The claude backend: your Claude Code CLI (`claude -p`), restarted whenever it exits
(night/sessions.py), its stream-json output read into supervisor.log one line per message, tool
call and result; it reaches the API through the night's key proxy (night/keyproxy.py) with a token
of the night, never the key.
"""

import json
import os
import shlex
import sys
from pathlib import Path

from harness import box, settings
from night.environment import KEY_ENV, agent_environment
from night.keyproxy import DEFAULT_UPSTREAM, KeyProxy
from night.sessions import (DEFAULT_MODEL_LABEL, LOG_RESULT_CHARS, AgentCLI, SessionLog,
                            cli_night)
from night.supervisor import Supervisor

# unattended: no permission prompts; stream-json so that every tool call and result reaches the log
DEFAULT_CLAUDE_COMMAND = ("claude -p --dangerously-skip-permissions --output-format stream-json "
                          "--verbose")

BASE_URL_ENV = "ANTHROPIC_BASE_URL"  # the CLI's API; the proxy's upstream
MODEL_ENV = "ANTHROPIC_MODEL"        # the CLI's model, where --model does not name one
# the CLI's other credential; with a key proxy the CLI has none but the night's token
AUTH_TOKEN_ENV = "ANTHROPIC_AUTH_TOKEN"

CLAUDE_STATE_FILE = ".claude.json"  # the CLI's state beside ~/.claude, without $CLAUDE_CONFIG_DIR

ROOT_REFUSAL = ("running as root: Claude Code refuses --dangerously-skip-permissions as root. Run "
                "the night as a non-root user, or, inside a container or VM you are willing to let "
                "the agent own, set IS_SANDBOX=1 (Claude Code's variable for sandboxed "
                "environments); see README, 'Threat model'")


def root_refusal(command: list, env: dict):
    """Claude Code refuses --dangerously-skip-permissions as root unless IS_SANDBOX is set: say so
    before starting."""
    if (os.geteuid() == 0 and "--dangerously-skip-permissions" in command
            and not env.get("IS_SANDBOX")):
        return ROOT_REFUSAL
    return None


def claude_environment(sup, proxy: KeyProxy = None) -> dict:
    """The CLI's environment: the allowlist and its own settings, a Bash tool timeout above the
    longest training run (the CLI's default, 2 minutes, would cut every run and blame the idea's
    code) and, with a key, the key proxy as its API and the night's token as its key."""
    env = agent_environment(sup.args.pass_env, client=True, night=sup.night, agent=sup.agent)
    ms = str(int((sup.args.train_timeout + settings.TOOL_MARGIN_S) * 1000))
    env.update(BASH_DEFAULT_TIMEOUT_MS=ms, BASH_MAX_TIMEOUT_MS=ms)
    if proxy is not None:
        env.pop(AUTH_TOKEN_ENV, None)
        env[KEY_ENV] = proxy.token
        env[BASE_URL_ENV] = box.RELAY_URL if sup.isolated else proxy.url
    return env


def model_of(command: list, env: dict) -> str:
    """The model the CLI will use: --model in the command, else $ANTHROPIC_MODEL, else
    DEFAULT_MODEL_LABEL."""
    for i, word in enumerate(command):
        if word == "--model" and i + 1 < len(command):
            return command[i + 1]
        if word.startswith("--model="):
            return word.removeprefix("--model=")
    return env.get(MODEL_ENV) or DEFAULT_MODEL_LABEL


class ClaudeLog(SessionLog):
    """Claude Code's stream-json events, one log line per message, tool call and result."""

    def describe(self, event: dict) -> list:
        kind = event.get("type")
        if kind == "assistant":
            out = []
            for block in event.get("message", {}).get("content", []):
                if block.get("type") == "text":
                    out.append(f"[assistant] {block.get('text', '')}")
                elif block.get("type") == "tool_use":
                    out.append(f"[tool {block.get('name')}] "
                               f"{json.dumps(block.get('input'))[:LOG_RESULT_CHARS]}")
            return out
        if kind == "user":
            out = []
            for block in event.get("message", {}).get("content", []):
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    content = block.get("content")
                    if isinstance(content, list):
                        content = "\n".join(c.get("text", "") for c in content
                                            if isinstance(c, dict))
                    flag = " ERROR" if block.get("is_error") else ""
                    out.append(f"[result{flag}] {str(content)[-LOG_RESULT_CHARS:]}")
            return out
        if kind == "system" and event.get("subtype") == "api_retry":
            self.api_retry = (f"API error {event.get('error_status') or ''} {event.get('error')}, "
                              f"retry {event.get('attempt')} of {event.get('max_retries')}"
                              ).replace("  ", " ")
            self.last_error = self.api_retry
            return [f"[claude] {self.api_retry}"]
        if kind == "result":
            text = str(event.get("result", ""))
            if event.get("is_error"):
                self.last_error = text.strip() or str(event.get("subtype"))
            self.last_line = text.splitlines()[-1] if text.strip() else self.last_line
            return [f"[claude result {event.get('subtype')}] {text[-LOG_RESULT_CHARS:]}"]
        if kind == "system" and event.get("subtype") == "init":
            return [f"[claude] session {event.get('session_id')} in {event.get('cwd')}, "
                    f"model {event.get('model')}"]
        return []


def config_paths(env: dict) -> list:
    """What the CLI writes outside the worktree: its config folder ($CLAUDE_CONFIG_DIR, or
    ~/.claude and ~/.claude.json), made when absent so that it can be bound into the box."""
    if env.get("CLAUDE_CONFIG_DIR"):
        folder = Path(env["CLAUDE_CONFIG_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        return [folder]
    home = Path(env.get("HOME") or Path.home())
    folder, state = home / ".claude", home / CLAUDE_STATE_FILE
    folder.mkdir(exist_ok=True)
    if not state.exists():
        state.write_text("{}\n")  # what the CLI writes itself on its first start
    return [folder, state]


CLAUDE = AgentCLI(name="claude", log=ClaudeLog, config_paths=config_paths,
                  install_hint="install Claude Code: npm install -g @anthropic-ai/claude-code")


def run_claude(sup: Supervisor) -> int:
    """The claude backend: the CLI's night (night/sessions.py), once it may start."""
    command = shlex.split(sup.args.claude_command)
    sup.agent = f"claude {model_of(command, os.environ)}"
    proxy = (KeyProxy(sup.secret, os.environ.get(BASE_URL_ENV) or DEFAULT_UPSTREAM)
             if sup.secret else None)
    try:
        env = claude_environment(sup, proxy)
        refusal = root_refusal(command, env)
        if refusal:
            sup.stop(refusal, failed=True)
            print(f"error: {refusal}", file=sys.stderr)
            return sup.finish()
        return cli_night(sup, CLAUDE, command, env, proxy)
    finally:
        if proxy is not None:
            proxy.close()
