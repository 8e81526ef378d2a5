"""The night's key proxy (night/keyproxy.py) between a client and a loopback stand-in of the API: the
key goes upstream in the token's place and nowhere else, a request without the token never leaves, an
event stream reaches the client event by event, an unreachable API is an API error the CLI retries,
and nothing of the proxy outlives close()."""

import json
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from night.keyproxy import KeyProxy

SECRET = "sk-ant-test-PROXY-91ac2e"


class Upstream:
    """A stand-in API that records each request's headers and body; /v1/stream answers with two
    server-sent events, chunked, the second only once `release` is set."""

    def __init__(self):
        self.seen, self.release = [], threading.Event()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                upstream.seen.append((self.path, dict(self.headers.items()), body))
                if self.path.endswith("/stream"):
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    for event in (b"event: one\ndata: {}\n\n", b"event: two\ndata: {}\n\n"):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                        self.wfile.flush()
                        upstream.release.wait(timeout=120)
                    self.wfile.write(b"0\r\n\r\n")
                    return
                answer = json.dumps({"echo": body.decode()}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/base"

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream():
    up = Upstream()
    yield up
    up.close()


def post(url, key, path="/v1/messages", body=b'{"model": "m"}', header="x-api-key"):
    value = key if header == "x-api-key" else f"Bearer {key}"
    request = urllib.request.Request(url + path, data=body, headers={header: value})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_key_goes_upstream_in_the_tokens_place_and_a_request_without_the_token_goes_nowhere(
        upstream):
    proxy = KeyProxy(SECRET, upstream.url)
    try:
        assert post(proxy.url, proxy.token) == (200, b'{"echo": "{\\"model\\": \\"m\\"}"}')
        assert post(proxy.url, proxy.token, header="authorization")[0] == 200
        status, body = post(proxy.url, "sk-ant-a-guess")
        assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
        assert post(proxy.url, SECRET)[0] == 401  # not even the key itself: only the token
    finally:
        proxy.close()
    assert [path for path, _, _ in upstream.seen] == ["/base/v1/messages"] * 2
    for _, headers, _ in upstream.seen:
        sent = {k.lower(): v for k, v in headers.items()}
        assert sent["x-api-key"] == SECRET and "authorization" not in sent
        assert proxy.token not in json.dumps(sent)
    assert proxy.refused == 2


def test_an_event_stream_reaches_the_client_event_by_event(upstream):
    proxy = KeyProxy(SECRET, upstream.url)
    try:
        request = urllib.request.Request(proxy.url + "/v1/stream", data=b"{}",
                                         headers={"x-api-key": proxy.token})
        with urllib.request.urlopen(request, timeout=60) as answer:
            # the first event arrives while the API still holds back the second
            assert answer.readline() == b"event: one\n"
            upstream.release.set()
            assert answer.read() == b"data: {}\n\nevent: two\ndata: {}\n\n"
    finally:
        proxy.close()


def test_an_unreachable_api_is_an_api_error_and_nothing_outlives_close():
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again: nothing listens there
    proxy = KeyProxy(SECRET, f"http://127.0.0.1:{port}")
    try:
        status, body = post(proxy.url, proxy.token)
    finally:
        proxy.close()
    assert status == 502
    error = json.loads(body)["error"]
    assert error["type"] == "api_error" and "cannot reach 127.0.0.1" in error["message"]
    assert SECRET not in body.decode()
    with pytest.raises(urllib.error.URLError):
        post(proxy.url, proxy.token)
    assert not proxy.folder.exists()
