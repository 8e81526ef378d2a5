"""
The final evaluation, in a process train.py never ran in. launch.py starts it in a clean
interpreter (`python -I`, the harness's imports only), joined to train.py by a socket pair; when
train.py ends (`run.finish`), its process only serves its model: it receives input batches and
returns their logits. This process alone reads the validation targets, computes the loss and
probes causality with batches it mixes among the evaluation's at random, so nothing train.py
rebinds, subclasses or leaves running reaches the number; launch.py writes and seals it once
train.py and everything it started are gone.

    train.py (serve)                          evaluator (main)
      ready {batch_size}              ->
                                      <-      batch {shape, dtype} + tokens   (each in random order)
      logits {shape, dtype} + bytes   ->      (a CUDA tensor: its IPC handle, no copy)
                                      <-      done

The wire format carries raw tensor bytes and JSON headers only (never a pickle), so the model's
process cannot run code in this one.
"""

import json
import math
import os
import random
import resource
import socket
import struct
import sys
import time

from harness import device as devices, metric
from harness.contract import HarnessError
from harness.tokenizer import Tokenizer, get_token_bytes

EVAL_FD_ENV = "AUTORESEARCH_EVAL_FD"  # train.py's end of the socket pair (set by launch.py)
HEADER = struct.Struct(">I")          # a message: its header's length, the JSON header, a payload
MAX_HEADER_BYTES = 1 << 16            # a header is a few fields; more is a broken peer
# the dtypes a batch or its logits may have: their names on the wire
DTYPES = ("int64", "float32", "bfloat16", "float16")
# probe batches mixed among the evaluation's: a model that reads later tokens cannot tell one from
# a measured batch, so it is caught each time
PROBES = 2
PROBE_ROWS = 2            # rows of a probe whose earlier logits are compared (memory: rows x T x V)
# seconds the model may take to answer one batch: a forward pass takes seconds even on a CPU; more
# is a model that hangs, and the run ends rather than waiting all night
ANSWER_TIMEOUT_S = 900
NO_MODEL_EXIT = 3         # train.py ended without serving its model (its own summary says why)
FAILED_EXIT = 1           # the evaluation failed: its one `error:` line says why
STARTED = "evaluator: started"  # its first line: its code is imported, train.py may start


class PeerGone(Exception):
    """The other end closed the socket."""


# ---------------------------------------------------------------------------
# The wire: JSON headers and raw bytes
# ---------------------------------------------------------------------------

def _recv_exact(sock, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 24))
        if not chunk:
            raise PeerGone()
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def send(sock, header: dict, payload: bytes = b""):
    head = json.dumps({**header, "size": len(payload)}).encode()
    sock.sendall(HEADER.pack(len(head)) + head)
    if payload:
        sock.sendall(payload)


def recv(sock) -> tuple:
    (n,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if n > MAX_HEADER_BYTES:
        raise HarnessError(f"a {n}-byte message header from the other process: not this protocol")
    header = json.loads(_recv_exact(sock, n))
    size = header.get("size")
    if not isinstance(size, int) or size < 0:
        raise HarnessError(f"message header without a valid size: {header}")
    return header, _recv_exact(sock, size) if size else b""


def _dtype(name):
    import torch
    if name not in DTYPES:
        raise HarnessError(f"tensor dtype {name!r} is not one of {', '.join(DTYPES)}: model(x) "
                           f"must return float32, bfloat16 or float16 logits")
    return getattr(torch, name)


def tensor_message(t) -> tuple:
    """(header, payload) of a tensor: its bytes, or on CUDA its IPC handle (the receiver maps the
    same memory; the sender keeps the tensor alive until the next message)."""
    import torch
    name = str(t.dtype).removeprefix("torch.")
    if t.is_cuda:
        return {"cuda": _cuda_handle(t), "dtype": name}, b""
    t = t.detach().contiguous()
    return {"shape": list(t.shape), "dtype": name}, t.view(-1).view(torch.uint8).numpy().tobytes()


def tensor_from(header: dict, payload: bytes):
    """The tensor a tensor_message describes (CPU bytes checked against its shape and dtype)."""
    import torch
    dtype = _dtype(header.get("dtype"))
    if "cuda" in header:
        return _cuda_tensor(header["cuda"], dtype)
    shape = header.get("shape")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise HarnessError(f"tensor header with an invalid shape: {shape!r}")
    if math.prod(shape) * dtype.itemsize != len(payload):
        raise HarnessError(f"tensor of shape {shape} and {dtype} sent with {len(payload)} bytes")
    if not payload:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(payload), dtype=dtype).view(shape)


def _cuda_handle(t) -> dict:
    """What another process needs to map a CUDA tensor (torch.multiprocessing's own reduction,
    its fields carried as JSON)."""
    from torch.multiprocessing.reductions import reduce_tensor
    _, args = reduce_tensor(t.detach())
    (_, size, stride, offset, _, _, dev, handle, storage_bytes, storage_offset, _, counter,
     counter_offset, event, event_sync) = args
    return {"size": list(size), "stride": list(stride), "offset": offset, "device": dev,
            "handle": handle.hex(), "storage_bytes": storage_bytes,
            "storage_offset": storage_offset, "counter": counter.hex(),
            "counter_offset": counter_offset, "event": event.hex() if event else None,
            "event_sync": bool(event_sync)}


def _cuda_tensor(h: dict, dtype):
    import torch
    storage = torch.UntypedStorage._new_shared_cuda(
        int(h["device"]), bytes.fromhex(h["handle"]), int(h["storage_bytes"]),
        int(h["storage_offset"]), bytes.fromhex(h["counter"]), int(h["counter_offset"]),
        bytes.fromhex(h["event"]) if h["event"] else None, bool(h["event_sync"]))
    t = torch.empty(0, dtype=dtype, device=f"cuda:{int(h['device'])}")
    return t.set_(storage, int(h["offset"]), h["size"], h["stride"])  # refused past the storage


# ---------------------------------------------------------------------------
# train.py's side: serve the model
# ---------------------------------------------------------------------------

def launcher_socket_given() -> bool:
    """Whether launch.py started this train.py (with the evaluator beside it)."""
    return bool(os.environ.get(EVAL_FD_ENV))


def launcher_socket():
    """train.py's end of launch.py's socket pair, or None when train.py runs without launch.py."""
    fd = os.environ.get(EVAL_FD_ENV)
    return socket.socket(fileno=int(fd)) if fd else None


def serve(model, sock, batch_size: int):
    """Answer the evaluator's batches with model(x) until it is done (train.py's process; call in
    eval mode under the evaluation's autocast)."""
    import torch
    dev = next(model.parameters()).device
    send(sock, {"kind": "ready", "batch_size": int(batch_size)})
    logits = None  # alive until the evaluator's next message: it may map its memory (CUDA)
    while True:
        header, payload = recv(sock)
        if header.get("kind") == "done":
            return
        with torch.no_grad():
            logits = model(tensor_from(header, payload).to(dev))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        send(sock, *tensor_message(logits))


# ---------------------------------------------------------------------------
# The evaluator's side
# ---------------------------------------------------------------------------

def probe_batch(x, cut: int, shift: int, vocab_size: int):
    """The rows of x with every token after position `cut` changed (each id moved by `shift`):
    a causal model's logits at positions <= cut cannot move."""
    changed = x.clone()
    changed[:, cut + 1:] = (changed[:, cut + 1:] + shift) % vocab_size
    return changed


def plan(n_batches: int, seq_len: int, vocab_size: int, rng: random.Random) -> list:
    """The order of the evaluation's batches, ("eval", k), and of the probes, ("probe", k, cut,
    shift), each a copy of batch k changed after a random cut, all shuffled together."""
    steps = [("eval", k) for k in range(n_batches)]
    steps += [("probe", rng.randrange(n_batches), rng.randrange(seq_len - 1),
               rng.randrange(1, vocab_size)) for _ in range(PROBES)]
    rng.shuffle(steps)
    return steps


def evaluate(ask, rows, token_bytes, batch_size: int, vocab_size: int, rng) -> dict:
    """val_bpb of the model behind `ask` (x -> logits) on `rows` ((n, T + 1) tokens), with its
    causality probes: {"val_bpb", "val_loss", "causality", "rows", "batch_size"}."""
    import torch
    dev = token_bytes.device
    starts = list(range(0, rows.size(0), batch_size))
    steps = plan(len(starts), rows.size(1) - 1, vocab_size, rng)
    totals = torch.zeros(3, dtype=torch.float64, device=dev)  # nats, bytes, tokens
    prefixes = {}  # (probe index, "eval" | "probe") -> its rows' logits at positions <= cut
    probes = [s for s in steps if s[0] == "probe"]
    for step in steps:
        chunk = rows[starts[step[1]]:starts[step[1]] + batch_size]
        x, y = chunk[:, :-1].contiguous(), chunk[:, 1:].to(dev)
        if step[0] == "probe":
            x = probe_batch(x, step[2], step[3], vocab_size)
        logits = ask(x)
        if (logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(y.shape)
                or logits.size(-1) < vocab_size or not logits.is_floating_point()):
            raise HarnessError(f"the model returned {tuple(logits.shape)} {logits.dtype} for "
                               f"inputs {tuple(y.shape)}: model(x) must return float logits "
                               f"(B, T, vocab) with vocab >= {vocab_size}")
        for i, probe in enumerate(probes):
            if probe[1] == step[1] and (step[0] == "eval" or probe is step):
                kept = logits[:PROBE_ROWS, :probe[2] + 1].float().clone()
                prefixes[i, step[0]] = kept
        if step[0] == "eval":
            totals += metric.batch_sums(logits, y, token_bytes)
        del logits
    nats, nbytes, ntokens = totals.tolist()
    changes = [(prefixes[i, "eval"] - prefixes[i, "probe"]).abs().max().item()
               for i in range(len(probes))]
    change = max(changes, default=0.0)
    return {"val_bpb": nats / (math.log(2) * nbytes), "val_loss": nats / ntokens,
            "causality": {"ok": change <= metric.CAUSALITY_TOLERANCE, "max_change": change,
                          "positions": [p[2] for p in probes], "rows": PROBE_ROWS,
                          "probes": len(probes)},
            "rows": rows.size(0), "batch_size": batch_size}


def main(argv) -> int:
    """The evaluator process: argv = [socket fd]. Prints STARTED once everything it runs is
    imported (launch.py starts train.py only then, so nothing train.py writes to disk reaches this
    process's code), then its result as one JSON line, or one `error:` line on stderr."""
    import torch  # noqa: F401  (now, before train.py exists; the device is only touched later)
    import torch.multiprocessing.reductions  # noqa: F401
    sock = socket.socket(fileno=int(argv[0]))
    print(STARTED, flush=True)
    try:
        header, _ = recv(sock)  # train.py has trained: the model is served
    except PeerGone:
        return NO_MODEL_EXIT
    if header.get("kind") != "ready":
        print(f"error: train.py's first message is not `ready`: {header}", file=sys.stderr)
        return FAILED_EXIT
    try:
        return _evaluate_served(sock, header)
    except PeerGone:
        print("error: train.py ended while its model was being evaluated", file=sys.stderr)
    except TimeoutError:
        print(f"error: the model did not answer a batch within {ANSWER_TIMEOUT_S} s",
              file=sys.stderr)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
    return FAILED_EXIT


def _evaluate_served(sock, header: dict) -> int:
    started = time.monotonic()
    sock.settimeout(ANSWER_TIMEOUT_S)
    dev = devices.autodetect_device()
    tokenizer = Tokenizer.from_directory()
    rows = metric.val_rows(tokenizer, metric.eval_rows(dev.type), fresh=True)
    batch_size = min(max(int(header.get("batch_size") or 1), 1), rows.size(0))

    def ask(x):
        header, payload = tensor_message(x)
        send(sock, {"kind": "batch", **header}, payload)
        answer, payload = recv(sock)
        return tensor_from(answer, payload).to(dev)

    result = evaluate(ask, rows, get_token_bytes(dev), batch_size, tokenizer.get_vocab_size(),
                      random.SystemRandom())
    send(sock, {"kind": "done"})
    result["seconds"] = time.monotonic() - started
    result["device"] = dev.type
    result["peak_memory_mb"] = devices.peak_memory_mb(dev) or resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024  # the device's, or this process's RSS (KiB: Linux)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
