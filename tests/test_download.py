"""
The climbmix download path against a real HTTP server on 127.0.0.1 whose answers are scripted per
shard: HTTP errors, bodies cut short (with and without Content-Length), truncated chunked bodies.
Nothing here touches the internet.
"""

import collections
import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness import contract, data as harness_data
from conftest import ROOT, run_script

FAST = dict(attempts=3, backoff_s=0.01)
SMALL_VOCAB = 300


# ---------------------------------------------------------------------------
# Shard contents: real parquet files with a `text` column, distinct per shard
# ---------------------------------------------------------------------------

_VOCABULARY = None


def _vocabulary():
    global _VOCABULARY
    if _VOCABULARY is None:
        rng = random.Random(1234)
        syllables = ["ka", "lo", "mi", "ren", "tu", "sha", "vo", "pe", "dri", "nu", "gel", "om", "ix", "ba",
                     "zor", "fi", "que", "ath", "wen", "ul"]
        _VOCABULARY = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
                              for _ in range(500)})
    return _VOCABULARY


def shard_bytes(index: int, n_docs: int = 120) -> bytes:
    rng = random.Random(index)
    words = _vocabulary()
    docs = [f"shard {index} doc {k}: " + " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))
            for k in range(n_docs)]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": docs, "id": list(range(n_docs))}), sink, row_group_size=32)
    return sink.getvalue().to_pybytes()


# ---------------------------------------------------------------------------
# The scriptable server
# ---------------------------------------------------------------------------

class ShardServer:
    """Serves `files` (URL path -> bytes). `script(name, *behaviours)` sets the answers to successive
    GETs of one file (the last one repeats): "ok", "503", "truncate" (full Content-Length, half the
    body, then close), "corrupt_no_length" (half the body, no Content-Length), "chunked_truncated"."""

    def __init__(self, delay_s: float = 0.0):
        self.files = {}
        self.scripts = {}
        self.requests = collections.Counter()  # (method, path) -> count
        self.delay_s = delay_s                 # per successful GET, to observe parallel downloads
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.url = None

    def add_shard(self, index: int, data: bytes = None) -> bytes:
        data = shard_bytes(index) if data is None else data
        self.files["/" + harness_data.shard_name(index)] = data
        return data

    def script(self, index: int, *behaviours):
        self.scripts["/" + harness_data.shard_name(index)] = list(behaviours)

    def gets(self, index: int) -> int:
        return self.requests[("GET", "/" + harness_data.shard_name(index))]

    def heads(self, index: int) -> int:
        return self.requests[("HEAD", "/" + harness_data.shard_name(index))]

    def _next_behaviour(self, method, path) -> str:
        with self.lock:
            n = self.requests[(method, path)]
            self.requests[(method, path)] += 1
        script = self.scripts.get(path, ["ok"])
        return script[min(n, len(script) - 1)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection; a body may end at close

    def log_message(self, *args):
        pass

    @property
    def state(self) -> ShardServer:
        return self.server.state

    def do_HEAD(self):
        self.state._next_behaviour("HEAD", self.path)
        body = self.state.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()

    def do_GET(self):
        state = self.state
        behaviour = state._next_behaviour("GET", self.path)
        body = state.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        if behaviour == "503":
            self.send_error(503, "busy, try again")
            return
        half = body[:len(body) // 2]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if behaviour == "ok":
            with state.lock:
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                time.sleep(state.delay_s)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            finally:
                with state.lock:
                    state.in_flight -= 1
        elif behaviour == "truncate":
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(half)
        elif behaviour == "corrupt_no_length":
            self.end_headers()
            self.wfile.write(half)
        elif behaviour == "chunked_truncated":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(f"{len(body):x}\r\n".encode() + half)
        else:
            raise AssertionError(f"unknown behaviour {behaviour!r}")
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def shard_server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    state = ShardServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = state
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def dest(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    return d


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def assert_no_leftovers(directory, allowed=()):
    names = sorted(p.name for p in directory.iterdir())
    assert names == sorted(allowed), names
    assert not any(".tmp" in n for n in names)


# ---------------------------------------------------------------------------
# download_shard
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("behaviours, expected_gets", [
    (["ok"], 1),
    (["503", "503", "ok"], 3),
    (["truncate", "ok"], 2),
    (["corrupt_no_length", "ok"], 2),
], ids=["plain", "503-twice-then-ok", "truncated-then-ok", "corrupt-then-ok"])
def test_download_shard_retries_until_complete(shard_server, dest, isolated_cache, behaviours, expected_gets,
                                               capsys):
    data = shard_server.add_shard(7)
    shard_server.script(7, *behaviours)
    path = harness_data.download_shard(7, dest, base_url=shard_server.url, **FAST)
    assert path == dest / harness_data.shard_name(7)
    assert path.read_bytes() == data
    assert shard_server.gets(7) == expected_gets
    assert_no_leftovers(dest, [harness_data.shard_name(7)])
    failures = [line for line in capsys.readouterr().err.splitlines() if "failed" in line]
    assert len(failures) == expected_gets - 1  # every failed attempt is reported


def test_download_shard_always_truncated(shard_server, dest, isolated_cache, capsys):
    shard_server.add_shard(3)
    shard_server.script(3, "truncate")
    with pytest.raises(contract.HarnessError) as exc:
        harness_data.download_shard(3, dest, base_url=shard_server.url, **FAST)
    message = str(exc.value)
    assert f"{shard_server.url}/{harness_data.shard_name(3)}" in message
    assert "after 3 attempts" in message and "truncated download" in message
    assert "--offline" in message  # says what to do instead
    assert shard_server.gets(3) == 3
    assert_no_leftovers(dest)
    assert capsys.readouterr().err.count("attempt ") == 3


def test_download_shard_rejects_corrupt_body_without_length(shard_server, dest, isolated_cache):
    data = shard_server.add_shard(4)
    shard_server.script(4, "corrupt_no_length")
    # the cut body really is a broken parquet file: only verify_parquet can tell
    broken = dest.parent / "broken.parquet"
    broken.write_bytes(data[:len(data) // 2])
    with pytest.raises(contract.HarnessError, match="corrupt parquet"):
        harness_data.verify_parquet(broken)
    broken.unlink()

    with pytest.raises(contract.HarnessError) as exc:
        harness_data.download_shard(4, dest, base_url=shard_server.url, **FAST)
    assert "corrupt parquet file" in str(exc.value)  # caught by verification, not by a length check
    assert "truncated download" not in str(exc.value)
    assert shard_server.gets(4) == 3
    assert_no_leftovers(dest)


def test_download_shard_gives_up_on_http_errors(shard_server, dest, isolated_cache):
    shard_server.add_shard(5)
    shard_server.script(5, "503")
    with pytest.raises(contract.HarnessError, match="503") as exc:
        harness_data.download_shard(5, dest, base_url=shard_server.url, **FAST)
    assert harness_data.shard_name(5) in str(exc.value)
    assert shard_server.gets(5) == 3
    assert_no_leftovers(dest)


def test_download_shard_backoff_doubles(shard_server, dest, isolated_cache):
    shard_server.add_shard(6)
    shard_server.script(6, "503")
    t0 = time.monotonic()
    with pytest.raises(contract.HarnessError):
        harness_data.download_shard(6, dest, base_url=shard_server.url, attempts=3, backoff_s=0.1)
    assert time.monotonic() - t0 >= 0.1 + 0.2  # slept 0.1 s, then 0.2 s


def test_download_shard_truncated_chunked_body(shard_server, dest, isolated_cache):
    data = shard_server.add_shard(8)
    shard_server.script(8, "chunked_truncated", "ok")
    try:
        path = harness_data.download_shard(8, dest, base_url=shard_server.url, **FAST)
    finally:
        assert not any(".tmp" in p.name for p in dest.iterdir())
    assert path.read_bytes() == data and shard_server.gets(8) == 2


def test_download_shard_rejects_corrupt_data_pages(shard_server, dest, isolated_cache):
    damaged = bytearray(shard_bytes(9))
    for k in range(200, 4000):  # inside the first row group's pages; the footer is intact
        damaged[k] ^= 0x5A
    shard_server.add_shard(9, bytes(damaged))
    with pytest.raises(contract.HarnessError):
        harness_data.download_shard(9, dest, base_url=shard_server.url, **FAST)
    assert_no_leftovers(dest)


def test_existing_valid_shard_is_not_downloaded_again(shard_server, dest, isolated_cache):
    shard_server.add_shard(2)
    local = shard_bytes(102)  # a valid shard, different from what the server has
    (dest / harness_data.shard_name(2)).write_bytes(local)
    path = harness_data.download_shard(2, dest, base_url=shard_server.url, **FAST)
    assert path.read_bytes() == local
    assert shard_server.gets(2) == 0


def test_existing_corrupt_shard_is_replaced(shard_server, dest, isolated_cache):
    data = shard_server.add_shard(2)
    (dest / harness_data.shard_name(2)).write_bytes(data[: len(data) // 3])  # an interrupted earlier download
    path = harness_data.download_shard(2, dest, base_url=shard_server.url, **FAST)
    assert path.read_bytes() == data
    assert shard_server.gets(2) == 1
    assert_no_leftovers(dest, [harness_data.shard_name(2)])


# ---------------------------------------------------------------------------
# network_reachable
# ---------------------------------------------------------------------------

def test_network_reachable(shard_server):
    shard_server.add_shard(harness_data.VAL_SHARD)
    assert harness_data.network_reachable(shard_server.url, timeout=5) is True
    assert shard_server.heads(harness_data.VAL_SHARD) == 1
    assert shard_server.gets(harness_data.VAL_SHARD) == 0  # a HEAD probe, not a download
    # any HTTP answer counts as reachable, even a 404
    assert harness_data.network_reachable(f"{shard_server.url}/no/such/dataset", timeout=5) is True
    assert shard_server.requests[("HEAD", f"/no/such/dataset/{harness_data.shard_name(harness_data.VAL_SHARD)}")] == 1
    t0 = time.monotonic()
    assert harness_data.network_reachable(closed_port_url(), timeout=5) is False
    assert time.monotonic() - t0 < 2  # a refused connection is answered at once


# ---------------------------------------------------------------------------
# download_climbmix
# ---------------------------------------------------------------------------

def test_download_climbmix_parallel_in_order(shard_server, isolated_cache):
    n = 4
    data = {i: shard_server.add_shard(i) for i in [*range(n), harness_data.VAL_SHARD]}
    shard_server.script(1, "503", "ok")
    shard_server.script(2, "truncate", "ok")
    shard_server.delay_s = 0.2
    train, val = harness_data.download_climbmix(n, base_url=shard_server.url, **FAST)
    dest = contract.cache_path(contract.DATA_DIR, "climbmix")
    assert train == [dest / harness_data.shard_name(i) for i in range(n)]
    assert val == [dest / harness_data.shard_name(harness_data.VAL_SHARD)]
    for i, path in zip([*range(n), harness_data.VAL_SHARD], train + val):
        assert path.read_bytes() == data[i]
    assert [shard_server.gets(i) for i in range(n)] == [1, 2, 2, 1]
    assert shard_server.gets(harness_data.VAL_SHARD) == 1
    assert shard_server.max_in_flight >= 2  # downloads overlapped
    assert_no_leftovers(dest, [p.name for p in train + val])


def test_download_climbmix_reports_failed_shard(shard_server, isolated_cache):
    for i in [0, 1, 2, harness_data.VAL_SHARD]:
        shard_server.add_shard(i)
    shard_server.script(1, "truncate")
    with pytest.raises(contract.HarnessError) as exc:
        harness_data.download_climbmix(3, base_url=shard_server.url, **FAST)
    assert "1 shard(s) failed" in str(exc.value) and harness_data.shard_name(1) in str(exc.value)
    # the good shards are kept for the next attempt; the bad one left nothing behind
    dest = contract.cache_path(contract.DATA_DIR, "climbmix")
    assert_no_leftovers(dest, [harness_data.shard_name(i) for i in [0, 2, harness_data.VAL_SHARD]])


@pytest.mark.parametrize("num_shards", [0, harness_data.MAX_SHARD + 1])
def test_download_climbmix_rejects_bad_shard_count(shard_server, isolated_cache, num_shards):
    with pytest.raises(contract.HarnessError, match="--num-shards must be between 1 and"):
        harness_data.download_climbmix(num_shards, base_url=shard_server.url, **FAST)
    assert sum(shard_server.requests.values()) == 0


# ---------------------------------------------------------------------------
# End to end: `prepare.py --num-shards 2` against the local server
# ---------------------------------------------------------------------------

def test_cli_climbmix_end_to_end(shard_server, tmp_path):
    data = {i: shard_server.add_shard(i) for i in [0, 1, harness_data.VAL_SHARD]}
    shard_server.script(0, "503", "ok")  # the CLI's own retry (default backoff 2 s) recovers
    cache = tmp_path / "cache"
    proc = run_script(["prepare.py", "--num-shards", "2", "--vocab-size", str(SMALL_VOCAB)], cwd=ROOT,
                      env_extra={"AUTORESEARCH_CACHE": str(cache), "AUTORESEARCH_DATA_URL": shard_server.url},
                      timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "no network" not in proc.stdout
    assert shard_server.heads(harness_data.VAL_SHARD) == 1  # the reachability probe
    assert [shard_server.gets(i) for i in (0, 1, harness_data.VAL_SHARD)] == [2, 1, 1]

    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["source"] == "climbmix"
    assert manifest["smoke_test"] is False
    assert manifest["vocab_size"] == SMALL_VOCAB
    assert [f["path"] for f in manifest["train_files"]] == [f"data/climbmix/{harness_data.shard_name(i)}" for i in (0, 1)]
    assert [f["path"] for f in manifest["val_files"]] == [f"data/climbmix/{harness_data.shard_name(harness_data.VAL_SHARD)}"]
    for entry, i in zip(manifest["train_files"] + manifest["val_files"], [0, 1, harness_data.VAL_SHARD]):
        path = cache / entry["path"]
        assert path.read_bytes() == data[i]
        assert entry["sha256"] == contract.sha256_file(path)
        assert entry["bytes"] == len(data[i]) and entry["rows"] == 120
        assert entry["tokens"] > entry["rows"]
    assert manifest["train_tokens"] > 0 and manifest["val_tokens"] > 0
    assert (cache / "tokenizer" / "tokenizer.pkl").is_file()
    data_lines = [line for line in proc.stdout.splitlines() if line.startswith("data: ")]
    assert data_lines == [f"data: climbmix: {manifest['description']}"]
    assert "SMOKE-TEST" not in data_lines[0]
