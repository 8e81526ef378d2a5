"""
The key proxy: the night's API key stays in the supervisor. The agent's CLI gets a token of this
night instead (ANTHROPIC_API_KEY, or OPENAI_API_KEY for Codex) and this proxy as its API
(ANTHROPIC_BASE_URL, or Codex's provider base_url); the proxy
accepts only that token, puts the key in its place and passes the request on to the real API,
streaming the answer back as it comes. A transcript, a log or a probe of the CLI's memory holds at
most the token, which is worth nothing once the night (this process) has ended.

It listens on loopback, and on a Unix socket that a box without network reaches through the relay
its stopper runs (night/sandbox.py): that socket is the box's only way out.
"""

import http.client
import json
import secrets
import socketserver
import ssl
import tempfile
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DEFAULT_UPSTREAM = "https://api.anthropic.com"  # the Anthropic SDK's and Claude Code's default
OPENAI_UPSTREAM = "https://api.openai.com/v1"     # the OpenAI API's, Codex's default provider
# how each API takes its key: Anthropic's header, or OpenAI's bearer token
ANTHROPIC_CREDENTIAL, BEARER_CREDENTIAL = "x-api-key", "bearer"
TOKEN_PREFIX = "alr-night-"  # says what a leaked token is, in a transcript
SOCKET_NAME = "api.sock"
# an API answer streams for as long as the model writes; this only ends a dead connection
UPSTREAM_TIMEOUT_S = 600
CHUNK = 64 * 1024
# RFC 9110's connection-specific fields, and what the proxy sets itself
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade", "host", "content-length"}
CREDENTIALS = {"x-api-key", "authorization"}


def api_error(kind: str, message: str) -> bytes:
    """An error body as the Anthropic API writes one, so that the CLI shows (and logs) it."""
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()


class Upstream:
    """Where the proxy sends requests: the real API's base URL, through the environment's HTTPS
    proxy where one is set (and the host is not in NO_PROXY)."""

    def __init__(self, base_url: str):
        url = urllib.parse.urlsplit(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"the API's base URL {base_url!r} is not an http(s) URL")
        self.scheme, self.host, self.path = url.scheme, url.hostname, url.path
        self.port = url.port or (443 if url.scheme == "https" else 80)
        proxy = urllib.request.getproxies().get(url.scheme)
        self.via = (None if proxy is None or urllib.request.proxy_bypass(self.host)
                    else urllib.parse.urlsplit(proxy))

    def connect(self) -> http.client.HTTPConnection:
        host, port = ((self.host, self.port) if self.via is None
                      else (self.via.hostname, self.via.port or 80))
        if self.scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=UPSTREAM_TIMEOUT_S,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=UPSTREAM_TIMEOUT_S)
        if self.via is not None:
            conn.set_tunnel(self.host, self.port)  # CONNECT through the HTTPS proxy
        return conn


class Handler(BaseHTTPRequestHandler):
    """One request of the CLI: its token checked, the key put in its place, passed on; the
    proxy is its server's (`server.proxy`)."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass  # the CLI logs what it was answered; the supervisor's log has no line per call

    def address_string(self):
        return "box"  # a Unix socket's peer has no address

    def do_GET(self):
        self._forward()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _reply(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self):
        proxy = self.server.proxy
        body = self._body()
        offered = {self.headers.get("x-api-key"),
                   self.headers.get("authorization", "").removeprefix("Bearer ")}
        if proxy.token not in offered:
            proxy.refused += 1
            return self._reply(401, api_error(
                "authentication_error", "the night's key proxy accepts only its night's token"))
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in HOP_BY_HOP | CREDENTIALS}
        if proxy.credential == BEARER_CREDENTIAL:
            headers["authorization"] = f"Bearer {proxy.secret}"
        else:
            headers["x-api-key"] = proxy.secret
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers["content-length"] = str(len(body))
        conn = proxy.upstream.connect()
        try:
            conn.request(self.command, proxy.upstream.path + self.path, body=body or None,
                         headers=headers)
            answer = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            return self._reply(502, api_error(
                "api_error", f"the night's key proxy cannot reach {proxy.upstream.host}: {e}"))
        try:
            self._pass_back(answer)
        finally:
            conn.close()

    def _pass_back(self, answer: http.client.HTTPResponse):
        """The upstream answer as it arrives: with its length where it said one, else
        chunked, each piece flushed (an event stream reaches the CLI event by event)."""
        self.send_response(answer.status, answer.reason)
        length = answer.getheader("content-length")
        for key, value in answer.getheaders():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        chunked = length is None and self.command != "HEAD"
        if length is not None:
            self.send_header("content-length", length)
        if chunked:
            self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        while self.command != "HEAD":
            piece = answer.read1(CHUNK)
            if not piece:
                break
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            self.wfile.flush()
        if chunked:
            self.wfile.write(b"0\r\n\r\n")




class KeyProxy:
    """The proxy of one agent (one supervisor): its token, its loopback URL and its socket; serves
    in threads of this process until close()."""

    def __init__(self, secret: str, upstream: str = DEFAULT_UPSTREAM,
                 credential: str = ANTHROPIC_CREDENTIAL):
        self.secret, self.upstream, self.credential = secret, Upstream(upstream), credential
        self.token = TOKEN_PREFIX + secrets.token_urlsafe(24)
        self.refused = 0  # requests without the token (a probe, another night's CLI)
        self.tcp = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.folder = Path(tempfile.mkdtemp(prefix="alr-proxy-"))  # 0700: this user's only
        self.socket = self.folder / SOCKET_NAME
        self.unix = socketserver.ThreadingUnixStreamServer(str(self.socket), Handler)
        for server in (self.tcp, self.unix):
            server.daemon_threads, server.proxy = True, self
            threading.Thread(target=server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.tcp.server_address[1]}"

    def close(self):
        for server in (self.tcp, self.unix):
            server.shutdown()
            server.server_close()
        self.socket.unlink(missing_ok=True)
        self.folder.rmdir()
