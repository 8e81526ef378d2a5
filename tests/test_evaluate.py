"""evaluate_bpb, the fixed metric, against a hand computation on toy models: the harness computes
the loss from the model's logits. The expected rows are built here from the val files themselves
(pyarrow, the tokenizer, the packing the harness documents), never taken from the harness's cache."""

import json
import math
import random

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from harness import contract, evaluation, metric, settings, tokenizer as harness_tokenizer
from harness.tokenizer import get_token_bytes

PACKING_BUFFER_DOCS = 1000  # packed_rows' documented default: documents held for best-fit packing


class ToyModel(nn.Module):
    """Returns the same logits at every position: a bias per token id, so the cross-entropy of a target t
    is known by hand, logsumexp(bias) - bias[t] = LSE + (t % 7) * 0.25."""

    def __init__(self, vocab):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives evaluate_bpb a device to read
        self.bias = -(torch.arange(vocab) % 7).float() * 0.25

    def forward(self, x):
        return (self.bias + self.anchor).expand(*x.shape, -1)


class Bigram(nn.Module):
    """Logits from the input token alone, a fixed random table: the loss at each position depends on the
    exact (input, target) pair, so a shifted, reordered or mis-cropped row changes the number."""

    def __init__(self, vocab, seed=0):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 2

    def forward(self, x):
        return self.table[x] + self.anchor

    def loss_of(self, prev, target):
        if not hasattr(self, "_lse"):
            self._lse = torch.logsumexp(self.table.double(), 1).tolist()
        return self._lse[prev] - self.table[prev, target].item()


def toy_loss(tokenizer):
    lse = torch.logsumexp(ToyModel(tokenizer.get_vocab_size()).bias, 0).item()
    return lambda prev, t: lse + (t % 7) * 0.25


def val_documents():
    """The val split's non-empty texts, read with pyarrow in file and row-group order, forever (epochs)."""
    manifest = json.loads(contract.cache_path(contract.MANIFEST).read_text())
    paths = [contract.cache_path(f["path"]) for f in manifest["val_files"]]
    while True:
        for path in paths:
            pf = pq.ParquetFile(path)
            for rg in range(pf.num_row_groups):
                yield [t for t in pf.read_row_group(rg).column("text").to_pylist() if t]


def expected_val_rows(tokenizer, n_rows, row_len=settings.MAX_SEQ_LEN + 1):
    """The first n_rows evaluation rows, packed as packed_rows documents it: every document is BOS +
    its tokens; before each placement the buffer is topped up to PACKING_BUFFER_DOCS documents from
    the next row groups; the largest document that fits the space left goes in (of equal lengths, the
    one read last), and when none fits the shortest (of equal lengths, the one read first) is cropped
    to fill the row. Plain lists here, no bisect: an independent implementation of that rule."""
    bos = tokenizer.get_bos_token_id()
    docs = val_documents()
    buffer = []  # (read order, ids)
    order = 0
    rows = []
    while len(rows) < n_rows:
        row = []
        while len(row) < row_len:
            while len(buffer) < PACKING_BUFFER_DOCS:
                for text in next(docs):
                    buffer.append((order, [bos] + tokenizer.enc.encode_ordinary(text)))
                    order += 1
            space = row_len - len(row)
            fitting = [d for d in buffer if len(d[1]) <= space]
            if fitting:
                pick = max(fitting, key=lambda d: (len(d[1]), d[0]))
            else:
                pick = min(buffer, key=lambda d: (len(d[1]), d[0]))
            buffer.remove(pick)
            row += pick[1][:space]
        rows.append(row)
    return rows


def counted(tokenizer, token) -> bool:
    """Special tokens (BOS) carry no bytes and are excluded from every sum."""
    return token not in {tokenizer.enc.encode_single_token(t) for t in harness_tokenizer.SPECIAL_TOKENS}


def hand_sums(tokenizer, rows, loss_of):
    """(nats, bytes, counted targets) over rows, each row's input[i] = row[i] predicting row[i + 1]."""
    nats = nbytes = n = 0
    for row in rows:
        for prev, target in zip(row[:-1], row[1:]):
            if counted(tokenizer, target):
                nats += loss_of(prev, target)
                nbytes += len(tokenizer.enc.decode_single_token_bytes(target))
                n += 1
    return nats, nbytes, n


def hand_bpb(tokenizer, rows, loss_of):
    nats, nbytes, _ = hand_sums(tokenizer, rows, loss_of)
    return nats / (math.log(2) * nbytes)


FINAL_ROWS = settings.CPU_EVAL_TOKENS // settings.MAX_SEQ_LEN
CURVE_ROWS = settings.CPU_VAL_CURVE_TOKENS // settings.MAX_SEQ_LEN


def test_the_expected_rows_are_packed_documents_of_the_val_split(prepared, tokenizer):
    """The independent rows themselves: full length, each a run of whole val documents (BOS + tokens)
    that starts at a document start and ends with one cropped to fill the row."""
    bos = tokenizer.get_bos_token_id()
    manifest = json.loads(contract.cache_path(contract.MANIFEST).read_text())
    val_docs = {tuple(tokenizer.enc.encode_ordinary(t)) for f in manifest["val_files"]
                for t in pq.read_table(contract.cache_path(f["path"])).column("text").to_pylist() if t}
    rows = expected_val_rows(tokenizer, FINAL_ROWS)
    assert len(rows) == FINAL_ROWS and all(len(r) == settings.MAX_SEQ_LEN + 1 for r in rows)
    for row in rows:
        assert row[0] == bos
        starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
        pieces = [tuple(row[a + 1:b]) for a, b in zip(starts, starts[1:])]
        assert all(piece in val_docs for piece in pieces[:-1])
        assert any(doc[:len(pieces[-1])] == pieces[-1] for doc in val_docs)


def test_matches_hand_computation(prepared, tokenizer):
    model = Bigram(tokenizer.get_vocab_size())
    expected = hand_bpb(tokenizer, expected_val_rows(tokenizer, FINAL_ROWS), model.loss_of)
    got = metric.evaluate_val(model, tokenizer, batch_size=3)[0]
    assert got == pytest.approx(expected, rel=1e-6)


def test_independent_of_batch_size(prepared, tokenizer):
    model = ToyModel(tokenizer.get_vocab_size())
    values = {metric.evaluate_val(model, tokenizer, batch_size=b)[0] for b in (1, 2, 8)}
    assert max(values) - min(values) < 1e-9


def test_curve_slice_is_smaller_and_fixed(prepared, tokenizer):
    model = Bigram(tokenizer.get_vocab_size(), seed=1)
    curve = metric.evaluate_val(model, tokenizer, batch_size=2, curve=True)[0]
    assert curve == pytest.approx(hand_bpb(tokenizer, expected_val_rows(tokenizer, CURVE_ROWS), model.loss_of),
                                  rel=1e-6)
    assert curve != pytest.approx(metric.evaluate_val(model, tokenizer, batch_size=2)[0], rel=1e-6)


def test_bias_model_matches_hand_computation(prepared, tokenizer):
    expected = hand_bpb(tokenizer, expected_val_rows(tokenizer, FINAL_ROWS), toy_loss(tokenizer))
    got = metric.evaluate_val(ToyModel(tokenizer.get_vocab_size()), tokenizer, batch_size=3)[0]
    assert got == pytest.approx(expected, rel=1e-6)


def test_uniform_model_scores_log_vocab_per_token(prepared, tokenizer):
    class Uniform(ToyModel):
        def forward(self, x):
            return torch.zeros(*x.shape, tokenizer.get_vocab_size()) + self.anchor

    rows = expected_val_rows(tokenizer, FINAL_ROWS)
    expected = hand_bpb(tokenizer, rows, lambda prev, t: math.log(tokenizer.get_vocab_size()))
    assert metric.evaluate_val(Uniform(1), tokenizer, batch_size=4)[0] == pytest.approx(expected, rel=1e-6)


def test_val_loss_is_mean_nats_per_counted_token(prepared, tokenizer):
    model = Bigram(tokenizer.get_vocab_size(), seed=2)
    nats, _, n = hand_sums(tokenizer, expected_val_rows(tokenizer, FINAL_ROWS), model.loss_of)
    bpb, loss = metric.evaluate_val(model, tokenizer, batch_size=3)
    assert loss == pytest.approx(nats / n, rel=1e-6)
    assert bpb == metric.evaluate_val(model, tokenizer, batch_size=3)[0]


def test_the_loss_is_the_harnesss_the_model_gives_logits_only(prepared, tokenizer):
    """A model cannot report its own (scaled) loss, nor see the targets: it gets x, returns logits."""
    class ReportsALoss(ToyModel):
        def forward(self, x, y=None, reduction="none"):
            assert y is None  # the targets are never passed
            return (x % 7).float() * 0.0 + self.anchor  # a per-token "loss" (B, T), as before
    with pytest.raises(contract.HarnessError, match=r"model\(x\) must return logits of shape \(B, T, vocab\)"):
        metric.evaluate_val(ReportsALoss(1), tokenizer, batch_size=3)


class Lookahead(nn.Module):
    """Logits at position i from the token at i + 1 (the target): the cheat the causality probe must catch."""

    def __init__(self, vocab, ahead):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab))
        self.ahead = ahead

    def forward(self, x):
        return self.table[torch.roll(x, -1, dims=1) if self.ahead else x]


@pytest.mark.parametrize("ahead", [False, True])
def test_the_evaluators_probes_catch_a_model_that_reads_the_future(prepared, tokenizer, ahead):
    """The probes are batches of the evaluation's own shape, changed after a random cut, mixed among
    its batches: a model that reads ahead moves the earlier logits of the probe's rows."""
    torch.manual_seed(0)
    model = Lookahead(tokenizer.get_vocab_size(), ahead)
    rows = metric.val_rows(tokenizer, 6, fresh=True)
    asked = []

    def ask(x):
        asked.append(x.clone())
        with torch.no_grad():
            return model(x)

    result = evaluation.evaluate(ask, rows, get_token_bytes(), 2, tokenizer.get_vocab_size(),
                                 random.Random(1))
    probe = result["causality"]
    assert probe["ok"] is (not ahead) and probe["probes"] == evaluation.PROBES
    assert (probe["max_change"] > 0.1) if ahead else probe["max_change"] == 0.0
    assert len(asked) == 3 + evaluation.PROBES and {tuple(x.shape) for x in asked} == {(2, rows.size(1) - 1)}
    # the number is the evaluation batches' alone (probes do not count): bits per byte of all rows
    with torch.no_grad():
        logits = model(rows[:, :-1])
    y = rows[:, 1:].reshape(-1)
    nats = F.cross_entropy(logits.reshape(-1, logits.size(-1)).double(), y, reduction="none")
    nbytes = get_token_bytes()[y]
    expected = nats[nbytes > 0].sum().item() / (math.log(2) * nbytes.sum().item())
    assert result["val_bpb"] == pytest.approx(expected, rel=1e-6)  # fp32 cross-entropy


def test_a_finished_runs_number_cannot_be_supplied_by_the_caller(in_process_run, tmp_path):
    logger = in_process_run
    for fields in ({"val_bpb": 0.5}, {}):
        with pytest.raises(contract.HarnessError, match="val_bpb is the harness's"):
            logger.fail("ok", **fields)
    for field in ("val_bpb", "causality", "device"):
        with pytest.raises(contract.HarnessError, match="written by the harness, not by train.py"):
            logger.set(**{field: 0.5})
    assert not (tmp_path / "run_summary.json").exists()


class RecordSizes(TorchDispatchMode):
    """Records the numel of every tensor an aten op produces while it is active."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.sizes += [t.numel() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def test_the_loss_of_a_batch_is_computed_a_chunk_of_rows_at_a_time():
    """batch_sums never holds a tensor the size of the whole batch's logits (at 128 x 2048 x 8192,
    8 GiB in fp32, and as much again for their log-softmax): the largest tensor any op produces is
    one chunk of LOSS_CHUNK_ROWS rows; its sums are a plain whole-batch cross-entropy's."""
    chunk = metric.LOSS_CHUNK_ROWS
    assert chunk * settings.MAX_SEQ_LEN * settings.VOCAB_SIZE * 4 <= 2**30  # <= 1 GiB in fp32
    rows, T, vocab = 2 * chunk + 3, 12, 40  # two whole chunks and a partial one
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, T, vocab, generator=gen) * 3
    y = torch.randint(0, vocab, (rows, T), generator=gen)
    token_bytes = torch.randint(0, 4, (vocab,), generator=gen)  # 0 bytes: a special token
    token_bytes[y[0, 0]] = 0
    with RecordSizes() as recorded:
        sums = metric.batch_sums(logits, y, token_bytes)
    assert recorded.sizes and max(recorded.sizes) <= chunk * T * vocab < logits.numel()
    with RecordSizes() as whole:  # the probe does see a whole-batch log-softmax where there is one
        nats = F.cross_entropy(logits.reshape(-1, vocab).double(), y.reshape(-1), reduction="none")
    assert max(whole.sizes) >= logits.numel()
    nbytes = token_bytes[y.reshape(-1)]
    kept = nbytes > 0
    assert 0 < kept.sum() < y.numel()
    assert sums.dtype == torch.float64
    assert sums[0].item() == pytest.approx(nats[kept].sum().item(), rel=1e-6)
    assert sums[1:].tolist() == [nbytes.sum().item(), kept.sum().item()]
