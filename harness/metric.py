"""
The metric, val_bpb: bits per byte of the model's next-token predictions on the first rows of the
val split, at MAX_SEQ_LEN. The model returns logits for `model(x)`; the loss is computed here, from
the next tokens it never sees. Special tokens (BOS) have 0 bytes and count in no sum, so bpb does
not depend on the vocabulary. The final evaluation runs in launch.py's evaluator
(harness/evaluation.py), which also probes causality.
This is what makes runs comparable: part of the fixed harness.
"""

import math
import time

import numpy as np

from harness import loader, settings
from harness.contract import HarnessError
from harness.tokenizer import Tokenizer, get_token_bytes

# rows whose log-softmax exists at once: the loss costs 1/16 of 128 rows' logits in memory, not a
# second copy of them (8 GiB at 128 x 2048 x 8192)
LOSS_CHUNK_ROWS = 8
# largest |change| of an earlier logit allowed by the evaluator's causality probes; reading ahead
# moves them O(1)
CAUSALITY_TOLERANCE = 1e-2
_VAL_ROWS = {}              # (T, n_rows) -> int64 CPU tensor: the curve's rows, tokenized once


class _EvaluationClock:
    """Seconds this process spent in evaluate_val: the run logger's wall-clock stamps
    (harness/runlog.py, Run.log_step) subtract them, as the training clock leaves evaluations
    out."""

    def __init__(self):
        self.seconds = 0.0


EVALUATION_CLOCK = _EvaluationClock()


def eval_rows(device_type: str, curve: bool = False) -> int:
    """Rows of MAX_SEQ_LEN tokens behind the final evaluation, or a validation-curve point."""
    if device_type == "cuda":
        tokens = settings.VAL_CURVE_TOKENS if curve else settings.EVAL_TOKENS
    else:
        tokens = settings.CPU_VAL_CURVE_TOKENS if curve else settings.CPU_EVAL_TOKENS
    return max(1, tokens // settings.MAX_SEQ_LEN)


def eval_batch_rows(device_type: str, batch_size: int) -> list:
    """The distinct batch sizes (rows) the curve and final evaluations feed the model, sorted: each
    is one compiled graph, warmed before the training clock starts (warm_up_evaluation)."""
    sizes = set()
    for curve in (True, False):
        n = eval_rows(device_type, curve)
        sizes.update(min(batch_size, n - i) for i in range(0, n, batch_size))
    return sorted(sizes)


def val_rows(tokenizer: Tokenizer, n_rows: int, T: int = None, fresh: bool = False):
    """The first n_rows packed rows of the val split, T + 1 tokens each (T: MAX_SEQ_LEN); fresh:
    read from the val files now, bypassing this process's cache (the final evaluation: nothing
    written into the cache reaches its number)."""
    import torch
    T = T or settings.MAX_SEQ_LEN
    key = (T, n_rows)
    if fresh or key not in _VAL_ROWS:
        rows = loader.packed_rows(tokenizer, T + 1, "val")
        table = torch.from_numpy(np.stack([next(rows)[0] for _ in range(n_rows)]))
        if fresh:
            return table
        _VAL_ROWS[key] = table
    return _VAL_ROWS[key]


def warm_up_evaluation(model, tokenizer: Tokenizer, batch_size: int):
    """Run `model` once on every batch shape evaluate_val will use, so that no evaluation compiles
    a graph on the clock. Call it in eval mode under the evaluations' autocast; it measures
    nothing."""
    import torch
    device = next(model.parameters()).device
    sizes = eval_batch_rows(device.type, batch_size)
    rows = val_rows(tokenizer, sizes[-1])
    with torch.no_grad():
        for n in sizes:
            model(rows[:n, :-1].contiguous().to(device))


def evaluate_val(model, tokenizer: Tokenizer, batch_size: int, curve: bool = False,
                 fresh: bool = False):
    """(bits per byte, nats per token) of `model` on the val rows (the curve's small slice with
    `curve`); nats per token is in the units of train/loss. Its time goes to EVALUATION_CLOCK."""
    import torch
    started = time.monotonic()
    device = next(model.parameters()).device
    n_rows = eval_rows(device.type, curve)
    rows = val_rows(tokenizer, n_rows, fresh=fresh)
    token_bytes = get_token_bytes(device)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nats, bytes, tokens
    try:
        with torch.no_grad():
            for i in range(0, n_rows, batch_size):
                chunk = rows[i:i + batch_size].to(device)
                x, y = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()  # as training batches
                totals += batch_sums(model(x), y, token_bytes)
        nats, nbytes, ntokens = totals.tolist()  # one sync
    finally:
        EVALUATION_CLOCK.seconds += time.monotonic() - started
    return nats / (math.log(2) * nbytes), nats / ntokens


def batch_sums(logits, y, token_bytes):
    """(nats, bytes, tokens) over the tokens of one batch that have bytes, as a float64 tensor."""
    import torch
    totals = torch.zeros(3, dtype=torch.float64, device=y.device)
    for i in range(0, y.size(0), LOSS_CHUNK_ROWS):
        nbytes = token_bytes[y[i:i + LOSS_CHUNK_ROWS].reshape(-1)]
        nats = next_token_nats(logits[i:i + LOSS_CHUNK_ROWS], y[i:i + LOSS_CHUNK_ROWS])
        counted = nbytes > 0
        totals += torch.stack([(nats.double() * counted).sum(), nbytes.sum().double(),
                               counted.sum().double()])
    return totals


def next_token_nats(logits, y):
    """Per-token cross-entropy (nats, flat, fp32) of logits (B, T, V) against the next tokens
    (B, T)."""
    import torch.nn.functional as F
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(y.shape):
        raise HarnessError(f"the model returned {tuple(logits.shape)} for inputs {tuple(y.shape)}: "
                           f"model(x) must return logits of shape (B, T, vocab)")
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                           reduction="none")
