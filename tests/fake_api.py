"""A local stand-in for the Anthropic Messages API, scripted turn by turn, for the real Claude Code CLI
(which streams) and the anthropic SDK (which does not). Loopback only."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def outage(n):
    """A script entry: answer the next n agent requests with HTTP 500."""
    return error(500, "api_error", "Internal server error", n)


def error(status, kind, message, n=1):
    """A script entry: answer the next n agent requests with this API error."""
    return ("error", status, kind, message, n)


class StreamingMessagesAPI:
    """POST /v1/messages as the Anthropic API answers it, streamed (server-sent events) when asked, as
    Claude Code asks, or as one JSON body, as the SDK asks. Requests of the agent (those offering a
    tool named `agent_tool`) get the next scripted turn; an error() entry answers the next n with that
    API error. Anything else a client asks (a title, a token count) gets a short text."""

    def __init__(self, script, agent_tool="Bash"):
        self.script, self.agent_requests, self.failures_sent, self.keys = list(script), [], 0, set()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                api.keys.add(self.headers.get("x-api-key") or self.headers.get("authorization", "").removeprefix("Bearer "))
                if "count_tokens" in self.path:
                    return self.send_json(200, {"input_tokens": 100})
                if not any(t.get("name") == agent_tool for t in body.get("tools", [])):
                    return self.answer(body, [{"type": "text", "text": "ok"}])
                with api_lock:
                    head = api.script[0] if api.script else None
                    if isinstance(head, tuple) and head[0] == "error":
                        _, status, kind, message, n = head
                        api.failures_sent += 1
                        api.script[0] = head[:4] + (n - 1,)
                        if n == 1:
                            api.script.pop(0)
                        return self.send_json(status, {"type": "error", "error": {"type": kind, "message": message}},
                                              {"retry-after": "0"} if status == 429 else None)
                    api.agent_requests.append(body)
                    blocks = api.script.pop(0) if api.script else [{"type": "text", "text": "nothing more to do"}]
                self.answer(body, blocks)

            def answer(self, body, blocks):
                n = len(api.agent_requests)
                blocks = [dict(b, id=f"toolu_{n}_{i}") if b["type"] == "tool_use" else b for i, b in enumerate(blocks)]
                stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
                message = {"id": f"msg_{n}", "type": "message", "role": "assistant", "model": body.get("model"),
                           "content": [], "stop_reason": None, "stop_sequence": None,
                           "usage": {"input_tokens": 10, "output_tokens": 1}}
                if not body.get("stream"):
                    return self.send_json(200, {**message, "content": blocks, "stop_reason": stop})
                events = [("message_start", {"type": "message_start", "message": message})]
                for i, b in enumerate(blocks):
                    start = {"type": "text", "text": ""} if b["type"] == "text" else {**b, "input": {}}
                    delta = ({"type": "text_delta", "text": b["text"]} if b["type"] == "text"
                             else {"type": "input_json_delta", "partial_json": json.dumps(b["input"])})
                    events += [("content_block_start", {"type": "content_block_start", "index": i, "content_block": start}),
                               ("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta}),
                               ("content_block_stop", {"type": "content_block_stop", "index": i})]
                events += [("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                              "usage": {"output_tokens": 5}}),
                           ("message_stop", {"type": "message_stop"})]
                data = "".join(f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events).encode()
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def send_json(self, code, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        api_lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
