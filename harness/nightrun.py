"""
launch.py and analyze.py inside a boxed night's agent box: neither runs there, but in the night's
runner, outside the box (night/runs.py), asked through the Unix socket $AUTORESEARCH_RUN_SOCKET;
so the seals, the ledger and the archive are written by processes the agent's code never ran in.
What the command prints comes back as it is printed and it exits with the command's code, so the
agent's loop reads the same. This process ending (Ctrl-C, the CLI's timeout, the session's end)
ends the command: a run's train.py gets its grace and writes its crash summary, which is sealed.

On the socket: the request, one JSON line {"script": ..., "argv": [...], "env": {...},
"cwd": ...}; the answer, frames of a kind byte and a 4-byte length: OUTPUT (bytes the command
printed), then EXIT (its exit code, as text).
"""

import json
import os
import socket
import struct
import sys

FRAME = struct.Struct(">cI")
# what the runner runs for the agent: a training run, and the bookkeeping that writes the store
SCRIPTS = ("launch.py", "analyze.py")
OUTPUT, EXIT = b"o", b"x"
# a request is an argv and an environment: far below this
MAX_REQUEST = 1 << 20


def send_frame(conn: socket.socket, kind: bytes, payload: bytes):
    conn.sendall(FRAME.pack(kind, len(payload)) + payload)


def _read_exact(conn: socket.socket, n: int):
    parts = []
    while n:
        part = conn.recv(n)
        if not part:
            return None
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def read_frame(conn: socket.socket):
    """(kind, payload) of the next frame, or None once the other end has closed."""
    header = _read_exact(conn, FRAME.size)
    if header is None:
        return None
    kind, length = FRAME.unpack(header)
    payload = _read_exact(conn, length) if length else b""
    return None if payload is None else (kind, payload)


def ask(script: str, args: list, socket_path: str) -> int:
    """Have the night's runner run `script` (one of SCRIPTS) with `args`: its output on stdout,
    its exit code returned."""
    conn = socket.socket(socket.AF_UNIX)
    try:
        conn.connect(socket_path)
    except OSError as e:
        print(f"error: the night's runner does not answer at {socket_path} ({e.strerror}): the "
              f"night has ended, or this is not its agent's box", file=sys.stderr)
        return 1
    with conn:
        request = {"script": script, "argv": args, "env": dict(os.environ), "cwd": os.getcwd()}
        conn.sendall(json.dumps(request).encode() + b"\n")
        while (frame := read_frame(conn)) is not None:
            kind, payload = frame
            if kind == OUTPUT:
                os.write(sys.stdout.fileno(), payload)
            elif kind == EXIT:
                return int(payload)
    print(f"error: the night's runner ended before {script} did (the night is stopping)",
          file=sys.stderr)
    return 1
