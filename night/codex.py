"""
The codex backend: your OpenAI Codex CLI (`codex exec --json`), restarted whenever it exits
(night/sessions.py), its JSON events read into supervisor.log one line per message, command and
output. It reaches the API through the night's key proxy (night/keyproxy.py), declared to it as a
model provider of the night's, with a token of the night as its OPENAI_API_KEY, never the key.

Unlike Claude Code, Codex ends its `exec` session whenever the model ends its turn, which it does
to ask "should I continue?" however program.md insists: a session that ends without a new run in
the ledger is a failed one, resumed after a back-off like an outage (issue 22).
"""

import json
import os
import shlex
import sys
import tomllib
from pathlib import Path

from harness import box
from night.environment import OPENAI_KEY_ENV, agent_environment
from night.keyproxy import BEARER_CREDENTIAL, OPENAI_UPSTREAM, KeyProxy
from night.sessions import (DEFAULT_MODEL_LABEL, LOG_RESULT_CHARS, AgentCLI, SessionLog,
                            cli_night)
from night.supervisor import Supervisor

# non-interactive, every event as a JSON line; the night's box (or --no-sandbox, the user's
# choice) is the sandbox, so the CLI's own is bypassed (it cannot nest inside bubblewrap)
DEFAULT_CODEX_COMMAND = "codex exec --json --dangerously-bypass-approvals-and-sandbox"

BASE_URL_ENV = "OPENAI_BASE_URL"   # the API the key proxy passes requests on to
# the CLI's config, sessions and logs (default ~/.codex): the one CODEX_ setting it is passed
# (CODEX_API_KEY, say, is a credential, which would reach the agent's shell too)
HOME_ENV = "CODEX_HOME"
CONFIG_FILE = "config.toml"
# the model provider the night declares: the key proxy, on OpenAI's Responses API. Tune it with
# -c model_providers.alr-night.<key>=<value> in --codex-command (e.g. request_max_retries)
PROVIDER = "alr-night"
# the reconnect notices Codex prints while it retries the API
RETRY_MARK = "Reconnecting"


def provider_options(url: str) -> list:
    """The -c options that make the night's key proxy at `url` the CLI's model provider."""
    table = (f'{{name="the night\'s key proxy", base_url="{url}", env_key="{OPENAI_KEY_ENV}", '
             f'wire_api="responses"}}')
    return ["-c", f'model_provider="{PROVIDER}"', "-c", f"model_providers.{PROVIDER}={table}"]


def with_provider(command: list, url: str) -> list:
    """The command with the provider options right after `exec` (so that the user's own -c
    model_providers.alr-night.<key> options, later, refine the table), else at its end."""
    at = command.index("exec") + 1 if "exec" in command else len(command)
    return command[:at] + provider_options(url) + command[at:]


def codex_home(env: dict) -> Path:
    """The CLI's home: $CODEX_HOME, else ~/.codex."""
    return Path(env.get(HOME_ENV) or Path(env.get("HOME") or Path.home()) / ".codex")


def config_paths(env: dict) -> list:
    """What the CLI writes outside the worktree: its home ($CODEX_HOME, or ~/.codex), made when
    absent (the CLI refuses a CODEX_HOME that does not exist) so that it can be bound into the
    box."""
    home = codex_home(env)
    home.mkdir(parents=True, exist_ok=True)
    return [home]


def model_of(command: list, env: dict) -> str:
    """The model the CLI will use: -m/--model or -c model=... in the command, else its config's
    `model`, else DEFAULT_MODEL_LABEL."""
    named = None
    for i, word in enumerate(command[:-1]):
        if word in ("-m", "--model"):
            named = command[i + 1]
        elif word in ("-c", "--config") and command[i + 1].startswith("model="):
            named = command[i + 1].removeprefix("model=").strip().strip('"')
    if named:
        return named
    config = codex_home(env) / CONFIG_FILE
    try:
        return tomllib.loads(config.read_text()).get("model") or DEFAULT_MODEL_LABEL
    except FileNotFoundError:
        return DEFAULT_MODEL_LABEL
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{config} is not valid TOML ({e}): fix it, or name the model with "
                         f"-m in --codex-command") from None


def codex_environment(sup, proxy: KeyProxy = None) -> dict:
    """The CLI's environment: the allowlist, its home ($CODEX_HOME, where set) and, with a key,
    the night's token as its OPENAI_API_KEY (the key proxy is its provider, in its command)."""
    env = agent_environment(sup.args.pass_env, night=sup.night, agent=sup.agent)
    if HOME_ENV in os.environ:
        env[HOME_ENV] = os.environ[HOME_ENV]
    if proxy is not None:
        env[OPENAI_KEY_ENV] = proxy.token
    return env


class CodexLog(SessionLog):
    """`codex exec --json` events, one log line per message, command and output."""

    def describe(self, event: dict) -> list:
        kind = event.get("type")
        if kind == "thread.started":
            return [f"[codex] session {event.get('thread_id')}"]
        if kind == "error":  # the API failed; "Reconnecting... n/m" while the CLI retries
            message = str(event.get("message", ""))
            if message.startswith(RETRY_MARK):
                self.api_retry = message
            self.last_error = message
            return [f"[codex] API error: {message}"]
        if kind == "turn.failed":
            self.last_error = str((event.get("error") or {}).get("message", "turn failed"))
            return [f"[codex turn failed] {self.last_error}"]
        if kind == "turn.completed":
            self.answered = True
            usage = event.get("usage") or {}
            return [f"[codex turn completed] {usage.get('input_tokens')} input, "
                    f"{usage.get('output_tokens')} output tokens"]
        if kind in ("item.started", "item.completed"):
            return self.item(kind, event.get("item") or {})
        return []

    def item(self, kind: str, item: dict) -> list:
        what = item.get("type")
        if what == "command_execution":
            if kind == "item.started":
                return [f"[command] {item.get('command')}"]
            code = item.get("exit_code")
            flag = "" if code == 0 else f" ERROR (exit {code})"
            output = str(item.get("aggregated_output", ""))
            return [f"[result{flag}] {output[-LOG_RESULT_CHARS:]}"]
        if kind == "item.started":
            return []
        if what == "agent_message":
            self.answered = True
            text = str(item.get("text", "")).strip()
            self.last_line = text.splitlines()[-1] if text else self.last_line
            return [f"[assistant] {item.get('text', '')}"]
        if what == "reasoning":
            return [f"[reasoning] {str(item.get('text', ''))[:LOG_RESULT_CHARS]}"]
        if what == "error":  # a warning of the CLI's (an unknown model's metadata, say)
            return [f"[codex warning] {item.get('message')}"]
        if what == "file_change":
            changes = ", ".join(f"{c.get('kind')} {c.get('path')}"
                                for c in item.get("changes") or [])
            return [f"[file change] {changes}"]
        return [f"[{what}] {json.dumps(item)[:LOG_RESULT_CHARS]}"]


CODEX = AgentCLI(name="codex", log=CodexLog, config_paths=config_paths, run_needed=True,
                 install_hint="install Codex: npm install -g @openai/codex")


def run_codex(sup: Supervisor) -> int:
    """The codex backend: the CLI's night (night/sessions.py)."""
    command = shlex.split(sup.args.codex_command)
    try:
        sup.agent = f"codex {model_of(command, os.environ)}"
    except ValueError as e:  # a config.toml it cannot read: the CLI would refuse it too
        sup.stop(str(e), failed=True)
        print(f"error: {e}", file=sys.stderr)
        return sup.finish()
    proxy = (KeyProxy(sup.secret, os.environ.get(BASE_URL_ENV) or OPENAI_UPSTREAM,
                      credential=BEARER_CREDENTIAL) if sup.secret else None)
    try:
        env = codex_environment(sup, proxy)
        if proxy is not None:
            command = with_provider(command, box.RELAY_URL if sup.isolated else proxy.url)
        return cli_night(sup, CODEX, command, env, proxy)
    finally:
        if proxy is not None:
            proxy.close()
