"""
The training data at run time: rows of the train split packed BOS-aligned, best-fit, without
padding, and batched onto the device.
"""

import math
import random
from bisect import bisect_right, insort
from itertools import count

import numpy as np
import pyarrow.parquet as pq

from harness import contract, data
from harness.contract import HarnessError
from harness.tokenizer import Tokenizer


def split_files(split: str, manifest: dict = None) -> list:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    manifest = manifest or data.load_manifest()
    return [contract.cache_path(f["path"]) for f in manifest[f"{split}_files"]]


def _document_batches(split: str, seed: int):
    """Yield (list of texts, epoch) forever, one parquet row group at a time.
    Train visits row groups in a seed-dependent order that changes every epoch; val reads in file
    order."""
    files = split_files(split)
    parquet = {p: pq.ParquetFile(p) for p in files}
    units = [(p, rg) for p in files for rg in range(parquet[p].num_row_groups)]
    epoch = 1
    while True:
        order = list(units)
        if split == "train":
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for path, rg in order:
            yield data.row_group_texts(parquet[path], rg), epoch
        epoch += 1


def packed_rows(tokenizer: Tokenizer, row_len: int, split: str, seed: int = 0,
                buffer_size: int = 1000):
    """Yield (row, epoch) forever: numpy int64 rows of exactly row_len tokens.

    Every row starts at a document start (BOS). Documents are placed best-fit (the largest that fits
    the space left); when none fits, the shortest is cropped to fill the row, so there is no
    padding."""
    bos = tokenizer.get_bos_token_id()
    docs = _document_batches(split, seed)
    buffer = []   # sorted by length: (length, tiebreak, ids)
    tiebreak = count()
    epoch = 1
    while True:
        row = np.empty(row_len, dtype=np.int64)
        pos = 0
        while pos < row_len:
            while len(buffer) < buffer_size:
                texts, epoch = next(docs)
                for ids in tokenizer.encode(texts, prepend=bos):
                    insort(buffer, (len(ids), next(tiebreak), ids))
            space = row_len - pos
            i = bisect_right(buffer, (space, math.inf)) - 1
            n, _, ids = buffer.pop(i if i >= 0 else 0)
            take = min(n, space)
            row[pos:pos + take] = ids[:take]
            pos += take
        yield row, epoch


def make_dataloader(tokenizer: Tokenizer, B: int, T: int, split: str, device="cpu", seed: int = 0,
                    buffer_size: int = 1000):
    """Yield (inputs, targets, epoch) forever: contiguous (B, T) int64 tensors on `device`,
    targets = inputs shifted by one.

    On CUDA the rows are written straight into one preallocated pinned host buffer (inputs then
    targets, so each is contiguous) and copied to the GPU without blocking the host; before the
    buffer is refilled, the host waits for the previous copy only, not for the training step."""
    import torch
    if split != "train":
        raise HarnessError(f"make_dataloader serves the train split only (asked for {split!r}): "
                           f"the validation rows are the harness's, read by evaluate_val alone")
    device = torch.device(device)
    rows_iter = packed_rows(tokenizer, T + 1, split, seed, buffer_size)
    cuda = device.type == "cuda"
    host = torch.empty((2, B, T), dtype=torch.int64, pin_memory=cuda)
    host_np = host.numpy()
    copied = torch.cuda.Event() if cuda else None
    while True:
        if cuda:
            copied.synchronize()  # the previous batch has left the pinned buffer
        for b in range(B):
            row, epoch = next(rows_iter)
            host_np[0, b] = row[:-1]
            host_np[1, b] = row[1:]
        if cuda:
            batch = host.to(device, non_blocking=True)
            copied.record()
        else:
            batch = host.clone()  # a fresh tensor per batch: a caller may keep the previous one
        yield batch[0], batch[1], epoch

