"""A local stand-in for the OpenAI Responses API (POST /v1/responses, streamed as server-sent
events), scripted turn by turn, for the real Codex CLI. Loopback only.

The script is a list of turns: command(cmd) runs `cmd` through the CLI's own shell tool
(exec_command); say(text) answers with a message, which ends the CLI's turn and so its `codex exec`
session; outage(n) answers the next n requests with HTTP 500. A command that is still running when
the CLI hands back its output (the CLI yields after a few seconds and gives a session id) is waited
for as a model would: the stand-in polls it (write_stdin with nothing to write) until it exits,
before the script's next turn. A script may also be a dict of scripts, each for the requests whose
input holds its key (a worker's name in its prompt, say)."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SHELL_TOOL = "exec_command"  # the CLI's shell (its "unified exec"), as it offers it
POLL_TOOL = "write_stdin"
POLL_MS = 300_000  # the longest an empty poll may wait: the CLI answers as soon as the command ends
# how the CLI says a command has not ended yet, in the output it hands back
RUNNING = re.compile(r"Process running with session ID (\d+)")


def command(cmd):
    return ("command", cmd)


def say(text):
    return ("say", text)


def outage(n):
    """Answer the next n requests of the agent with HTTP 500."""
    return ("error", 500, "server_error", "Internal server error", n)


class ResponsesAPI:
    """The stand-in: `requests` holds each agent request's body, `keys` each bearer token seen,
    `failures_sent` the errors answered."""

    def __init__(self, script):
        self.scripts = ({k: list(v) for k, v in script.items()} if isinstance(script, dict)
                        else {"": list(script)})
        self.requests, self.keys, self.failures_sent = [], set(), 0
        self.lock, self.calls = threading.Lock(), 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # a model list, where the CLI asks for one
                self.send_json(200, {"object": "list", "data": [], "models": []})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0)))
                                  or b"{}")
                api.keys.add(self.headers.get("authorization", "").removeprefix("Bearer "))
                if not self.path.endswith("/responses"):
                    return self.send_json(404, {"error": {"message": f"no {self.path} here"}})
                with api.lock:
                    turn = api.next_turn(body)
                if turn[0] == "error":
                    _, status, kind, message, _ = turn
                    return self.send_json(status, {"error": {"type": kind, "message": message}})
                self.stream(body, turn)

            def stream(self, body, turn):
                with api.lock:
                    api.calls += 1
                    n = api.calls
                if turn[0] == "say":
                    item = {"type": "message", "role": "assistant", "id": f"msg_{n}",
                            "status": "completed",
                            "content": [{"type": "output_text", "text": turn[1],
                                         "annotations": []}]}
                else:
                    name, arguments = turn[1], turn[2]
                    item = {"type": "function_call", "id": f"fc_{n}", "call_id": f"call_{n}",
                            "name": name, "arguments": json.dumps(arguments),
                            "status": "completed"}
                response = {"id": f"resp_{n}", "object": "response", "model": body.get("model"),
                            "status": "completed", "output": [item],
                            "usage": {"input_tokens": 10, "output_tokens": 5,
                                      "total_tokens": 15,
                                      "input_tokens_details": {"cached_tokens": 0},
                                      "output_tokens_details": {"reasoning_tokens": 0}}}
                events = [
                    ("response.created", {"type": "response.created",
                                          "response": {**response, "status": "in_progress",
                                                       "output": []}}),
                    ("response.output_item.added", {"type": "response.output_item.added",
                                                    "output_index": 0, "item": item}),
                    ("response.output_item.done", {"type": "response.output_item.done",
                                                   "output_index": 0, "item": item}),
                    ("response.completed", {"type": "response.completed", "response": response}),
                ]
                data = "".join(f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events)
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("content-length", str(len(data.encode())))
                self.end_headers()
                self.wfile.write(data.encode())

            def send_json(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def next_turn(self, body):
        """What to answer this request with: a poll of a command still running, else the script's
        next turn (an error entry answers n requests)."""
        text = json.dumps(body.get("input"))
        script = next(v for k, v in self.scripts.items() if k in text)
        head = script[0] if script else None
        if head and head[0] == "error":
            self.failures_sent += 1
            script[0] = head[:4] + (head[4] - 1,)
            if head[4] == 1:
                script.pop(0)
            return head
        self.requests.append(body)
        running = self.still_running(body)
        if running is not None:
            return ("call", POLL_TOOL, {"session_id": running, "chars": "",
                                        "yield_time_ms": POLL_MS})
        if not script:
            return ("say", "nothing more to do")
        kind, value = script.pop(0)
        if kind == "command":
            return ("call", SHELL_TOOL, {"cmd": value, "yield_time_ms": 1000})
        return ("say", value)

    @staticmethod
    def still_running(body):
        """The session id of the command whose output the request hands back, if that command
        has not ended yet."""
        items = body.get("input") or []
        last = items[-1] if items else {}
        if last.get("type") != "function_call_output":
            return None
        output = last.get("output")
        if isinstance(output, list):
            output = "".join(part.get("text", "") for part in output if isinstance(part, dict))
        found = RUNNING.search(str(output or ""))
        return int(found[1]) if found else None

    def close(self):
        self.server.shutdown()
