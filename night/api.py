"""
The api backend: a built-in agent on the Anthropic Messages API with four tools (a shell command,
read, write and edit a file), each experiment from a fresh, compact context.
"""

import json
import subprocess
import time
from pathlib import Path

from analysis.store import IDEAS, INSIGHTS, NOTES_DIR, RESULTS_TSV, STORE_DIR
from night import rules, sandbox
from night.sessions import LOG_RESULT_CHARS, MAX_BACKOFF_S
from night.environment import agent_environment
from night.supervisor import PROGRAM, Supervisor, worker_preamble

DEFAULT_MODEL = "claude-sonnet-4-5"

# the SDK's own retries (429, 5xx, connection) with exponential backoff
API_MAX_RETRIES = 8

# then wait this long (doubling, up to 15 min) and retry, up to --max-outage-hours
API_OUTAGE_WAIT_S = 60.0

API_MAX_TOKENS = 8192

MAX_TURNS_PER_EXPERIMENT = 60        # tool calls in one api experiment before it is cut off

TOOL_OUTPUT_CHARS = 12_000           # the tail of a command's output returned to the model

TRIMMED_RESULT_CHARS = 2_000         # what an old tool result keeps when the context grows too long

DEFAULT_TOOL_TIMEOUT_S = 600         # a shell command's default limit (training has its own, below)


TOOLS = [
    {"name": "bash", "description": "Run a bash command in the repository root and return its "
     "exit code and the tail of its output. Training (`uv run launch.py`) takes "
     "about 5 minutes.",
     "input_schema": {"type": "object", "properties": {
         "command": {"type": "string"},
         "timeout_s": {"type": "integer",
                       "description": f"default {DEFAULT_TOOL_TIMEOUT_S}; training needs ~400"}},
         "required": ["command"]}},
    {"name": "read_file", "description": "Read a text file of the repository.",
     "input_schema": {"type": "object", "properties": {"path": {"type": "string"}},
                      "required": ["path"]}},
    {"name": "write_file", "description": "Create or overwrite a text file of the repository.",
     "input_schema": {"type": "object", "properties": {"path": {"type": "string"},
                                                       "content": {"type": "string"}},
                      "required": ["path", "content"]}},
    {"name": "edit_file",
     "description": "Replace one exact, unique occurrence of `old` by `new` in a file.",
     "input_schema": {"type": "object", "properties": {"path": {"type": "string"},
                                                       "old": {"type": "string"},
                                                       "new": {"type": "string"}},
                      "required": ["path", "old", "new"]}},
]


def experiment_prompt(sup: Supervisor) -> str:
    """A fresh, compact context for one experiment: the Current Best, the ideas queue, the last
    result."""
    parts = ["Do exactly one experiment of the loop in program.md (the system prompt): pick an "
             "idea, edit train.py, commit, train, analyze, read analysis.md, update insights.md "
             "and ideas_queue.md, then follow the verdict (keep, discard, or rerun with another "
             "SEED). When the experiment is done, reply with a short summary and no tool call."]
    for name, label in ((INSIGHTS, "insights.md"), (IDEAS, "ideas_queue.md")):
        path = sup.store.note(name)
        text = (path.read_text()[:6000] if path.exists()
                else "(missing: create it as program.md says)")
        parts.append(f"## {label}\n{text}")
    ledger = sup.store.read_ledger()
    own = sup.own_runs(ledger)
    if own:
        last = own[-1]
        parts.append(f"## The last run\n{last['run_id']}: val_bpb {last.get('val_bpb')}, "
                     f"status {last['status']}, "
                     f"verdict {last.get('verdict')}: {last.get('verdict_reason')} "
                     f"(analysis: {STORE_DIR}/{last['run_id']}/analysis.md)")
    else:
        parts.append("## The last run\nnone yet: do the setup of program.md first (baseline runs).")
    parts.append(f"({len(ledger)} runs in {STORE_DIR}/{RESULTS_TSV})")
    return "\n\n".join(parts)


def _inside(repo: Path, path: str) -> Path:
    target = (repo / path).resolve()
    if repo.resolve() not in (target, *target.parents):
        raise ValueError(f"{path} is outside the repository")
    return target


def _writable(sup: Supervisor, path: str) -> Path:
    """Where the write tools (which run in the supervisor, outside the box) may write: inside the
    repository, and, in a boxed night, nowhere the box holds read-only."""
    target = _inside(sup.repo, path)
    if not sup.unboxed and sandbox.read_only(sup.repo, target):
        raise ValueError(f"{path} is read-only to the agent: the harness, its environment, the "
                         f"store outside {STORE_DIR}/{NOTES_DIR}/ and git's hooks and config are "
                         f"not the experiment's")
    return target


def run_tool(sup: Supervisor, name: str, args: dict) -> tuple:
    """(text, is_error) of one tool call. The key is removed from the environment commands see."""
    try:
        if name == "bash":
            # no key, no other credentials
            env = agent_environment(sup.args.pass_env, night=sup.night, agent=sup.agent)
            timeout = min(float(args.get("timeout_s") or DEFAULT_TOOL_TIMEOUT_S),
                          sup.args.train_timeout)
            child = subprocess.Popen(sup.boxed(["bash", "-c", args["command"]]), cwd=sup.repo,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, start_new_session=True)
            sup.current = child
            try:
                out, _ = child.communicate(timeout=timeout)
                return (f"exit code {child.returncode}\n{out[-TOOL_OUTPUT_CHARS:]}",
                        child.returncode != 0)
            except subprocess.TimeoutExpired:
                sup.end_agent(child)
                out = child.stdout.read() if child.stdout else ""
                return f"killed after {timeout:.0f} s (timeout)\n{out[-TOOL_OUTPUT_CHARS:]}", True
            finally:
                sup.current = None
        if name == "read_file":
            return _inside(sup.repo, args["path"]).read_text()[:50_000], False
        if name == "write_file":
            path = _writable(sup, args["path"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(args["content"])
            return f"wrote {len(args['content'])} characters to {args['path']}", False
        if name == "edit_file":
            path = _writable(sup, args["path"])
            text = path.read_text()
            if text.count(args["old"]) != 1:
                return (f"`old` occurs {text.count(args['old'])} times in {args['path']}; it must "
                        f"occur exactly once", True)
            path.write_text(text.replace(args["old"], args["new"], 1))
            return f"edited {args['path']}", False
        return f"unknown tool {name}", True
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
        return f"{type(e).__name__}: {e}", True


class ContextTooLong(Exception):
    """The API refused the request as too long (400): trim the conversation and ask again."""


def call_api(sup: Supervisor, client, **request):
    """messages.create, retried by the SDK with backoff, then by waiting out longer outages (up to
    --max-outage-hours). None when the night must stop; errors that no retry can fix (401, 403, 404,
    a bad request) stop the night with the API's own message."""
    import anthropic
    wait, down_since = API_OUTAGE_WAIT_S, None
    while True:
        try:
            response = client.messages.create(**request)
            if down_since:
                sup.status(f"API answering again (down since {rules.hhmm(down_since)})")
            return response
        except (anthropic.APIConnectionError, anthropic.RateLimitError,
                anthropic.InternalServerError) as e:
            down_since = down_since or time.time()
            since = rules.hhmm(down_since)
            if time.time() - down_since >= sup.args.max_outage_hours * 3600:
                sup.stop(f"API unreachable since {since}: {type(e).__name__}: {e}", failed=True)
                return None
            sup.status(f"API unreachable since {since} ({type(e).__name__}); retrying in "
                       f"{wait:.0f} s")
            sup.sleep(wait)
            if sup.stopping:
                return None
            wait = min(wait * 2, MAX_BACKOFF_S)
        except anthropic.BadRequestError as e:
            if "too long" in api_message(e).lower() or "too many tokens" in api_message(e).lower():
                raise ContextTooLong(api_message(e)) from e
            sup.stop(f"the API refused a request ({e.status_code}): {api_message(e)}", failed=True)
            return None
        except (anthropic.AuthenticationError, anthropic.PermissionDeniedError,
                anthropic.NotFoundError) as e:
            sup.stop(f"the API refused the key or the model ({e.status_code}): {api_message(e)}",
                     failed=True)
            return None


def api_message(e) -> str:
    """The API's own words of an error response ("invalid x-api-key"), not the SDK's wrapping of
    them."""
    body = getattr(e, "body", None)
    if (isinstance(body, dict) and isinstance(body.get("error"), dict)
            and body["error"].get("message")):
        return str(body["error"]["message"])
    return str(getattr(e, "message", e))


def trim_context(messages: list) -> bool:
    """Shorten the oldest long tool results in place; False when nothing is left to shorten."""
    for message in messages[1:-1]:
        if message["role"] != "user" or not isinstance(message["content"], list):
            continue
        for block in message["content"]:
            if (block.get("type") == "tool_result"
                    and len(block.get("content", "")) > TRIMMED_RESULT_CHARS):
                block["content"] = ("[trimmed: the context grew too long]\n"
                                    + block["content"][-TRIMMED_RESULT_CHARS:])
                return True
    return False


def run_api(sup: Supervisor) -> int:
    import anthropic  # lazily: it takes seconds to import, and the claude backend does not need it
    client = anthropic.Anthropic(api_key=sup.secret, max_retries=API_MAX_RETRIES)
    sup.agent = f"api {sup.args.model}"
    system = worker_preamble(sup) + (sup.repo / PROGRAM).read_text()
    experiment = 0
    while not sup.check():
        experiment += 1
        sup.status(f"api experiment {experiment} started")
        sup.write_log(f"=== api experiment {experiment}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
        messages = [{"role": "user", "content": experiment_prompt(sup)}]
        for _ in range(MAX_TURNS_PER_EXPERIMENT):
            try:
                response = call_api(sup, client, model=sup.args.model, max_tokens=API_MAX_TOKENS,
                                    system=system, tools=TOOLS, messages=messages)
            except ContextTooLong as e:
                if trim_context(messages):
                    sup.write_log(f"context too long ({e}); trimmed the oldest tool result")
                    continue
                sup.status(f"api experiment {experiment} ended: its context is too long even "
                           f"trimmed ({e})")
                break
            if response is None:
                break
            content = [block.model_dump(exclude_none=True) for block in response.content]
            messages.append({"role": "assistant", "content": content})
            for block in content:
                if block["type"] == "text":
                    sup.write_log(f"[assistant] {block['text']}")
            calls = [b for b in content if b["type"] == "tool_use"]
            if not calls or sup.immediate:
                break
            results = []
            for call in calls:
                sup.write_log(f"[tool {call['name']}] "
                              f"{json.dumps(call['input'])[:LOG_RESULT_CHARS]}")
                text, is_error = run_tool(sup, call["name"], call["input"])
                text = sup.redact(text)
                sup.write_log(f"[result{' ERROR' if is_error else ''}] {text[-LOG_RESULT_CHARS:]}")
                results.append({"type": "tool_result", "tool_use_id": call["id"], "content": text,
                                "is_error": is_error})
            messages.append({"role": "user", "content": results})
            if sup.check() and (sup.immediate
                                or time.time() - sup.stop_seen_at >= sup.args.stop_grace):
                # any other stop rule lets the agent finish this experiment (keep or discard
                # it) first
                break
        else:
            sup.write_log(f"experiment {experiment} cut off after {MAX_TURNS_PER_EXPERIMENT} turns")
    return sup.finish()
