"""evaluate_bpb, the fixed metric, against a hand computation on toy models: the harness computes
the loss from the model's logits."""

import math

import pytest
import torch
import torch.nn as nn

import prepare


class ToyModel(nn.Module):
    """Returns the same logits at every position: a bias per token id, so the cross-entropy of a target t
    is known by hand, logsumexp(bias) - bias[t] = LSE + (t % 7) * 0.25."""

    def __init__(self, vocab):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives evaluate_bpb a device to read
        self.bias = -(torch.arange(vocab) % 7).float() * 0.25

    def forward(self, x):
        return (self.bias + self.anchor).expand(*x.shape, -1)


def toy_loss(tokenizer):
    lse = torch.logsumexp(ToyModel(tokenizer.get_vocab_size()).bias, 0).item()
    return lambda t: lse + (t % 7) * 0.25


def hand_bpb(tokenizer, rows, loss_of):
    bos = tokenizer.get_bos_token_id()
    nats = nbytes = 0.0
    for row in rows.tolist():
        for target in row[1:]:
            if target == bos:
                continue  # special tokens carry no bytes and are excluded
            nats += loss_of(target)
            nbytes += len(tokenizer.enc.decode_single_token_bytes(target))
    return nats / (math.log(2) * nbytes)


def test_matches_hand_computation(prepared, tokenizer):
    n_rows = prepare.CPU_EVAL_TOKENS // prepare.MAX_SEQ_LEN
    rows = prepare.val_rows(tokenizer, n_rows)
    expected = hand_bpb(tokenizer, rows, toy_loss(tokenizer))
    got = prepare.evaluate_bpb(ToyModel(tokenizer.get_vocab_size()), tokenizer, batch_size=3)
    assert got == pytest.approx(expected, rel=1e-6)


def test_independent_of_batch_size(prepared, tokenizer):
    model = ToyModel(tokenizer.get_vocab_size())
    values = {prepare.evaluate_bpb(model, tokenizer, batch_size=b) for b in (1, 2, 8)}
    assert max(values) - min(values) < 1e-9


def test_curve_slice_is_smaller_and_fixed(prepared, tokenizer):
    curve = prepare.evaluate_bpb(ToyModel(tokenizer.get_vocab_size()), tokenizer, batch_size=2, curve=True)
    rows = prepare.val_rows(tokenizer, prepare.CPU_VAL_CURVE_TOKENS // prepare.MAX_SEQ_LEN)
    assert curve == pytest.approx(hand_bpb(tokenizer, rows, toy_loss(tokenizer)), rel=1e-6)


def test_uniform_model_scores_log_vocab_per_token(prepared, tokenizer):
    class Uniform(ToyModel):
        def forward(self, x):
            return torch.zeros(*x.shape, tokenizer.get_vocab_size()) + self.anchor

    n_rows = prepare.CPU_EVAL_TOKENS // prepare.MAX_SEQ_LEN
    rows = prepare.val_rows(tokenizer, n_rows)
    expected = hand_bpb(tokenizer, rows, lambda t: math.log(tokenizer.get_vocab_size()))
    assert prepare.evaluate_bpb(Uniform(1), tokenizer, batch_size=4) == pytest.approx(expected, rel=1e-6)


def test_val_loss_is_mean_nats_per_counted_token(prepared, tokenizer):
    n_rows = prepare.CPU_EVAL_TOKENS // prepare.MAX_SEQ_LEN
    rows = prepare.val_rows(tokenizer, n_rows)
    bos = tokenizer.get_bos_token_id()
    targets = [t for row in rows.tolist() for t in row[1:] if t != bos]
    loss_of = toy_loss(tokenizer)
    expected = sum(loss_of(t) for t in targets) / len(targets)
    model = ToyModel(tokenizer.get_vocab_size())
    bpb, loss = prepare.evaluate_val(model, tokenizer, batch_size=3)
    assert loss == pytest.approx(expected, rel=1e-6)
    assert bpb == prepare.evaluate_bpb(model, tokenizer, batch_size=3)


def test_the_loss_is_the_harnesss_the_model_gives_logits_only(prepared, tokenizer):
    """A model cannot report its own (scaled) loss, nor see the targets: it gets x, returns logits."""
    class ReportsALoss(ToyModel):
        def forward(self, x, y=None, reduction="none"):
            assert y is None  # the targets are never passed
            return (x % 7).float() * 0.0 + self.anchor  # a per-token "loss" (B, T), as before
    with pytest.raises(prepare.HarnessError, match=r"model\(x\) must return logits of shape \(B, T, vocab\)"):
        prepare.evaluate_val(ReportsALoss(1), tokenizer, batch_size=3)


class Lookahead(nn.Module):
    """Logits at position i from the token at i + 1 (the target): the cheat the causality probe must catch."""

    def __init__(self, vocab, ahead):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab))
        self.ahead = ahead

    def forward(self, x):
        return self.table[torch.roll(x, -1, dims=1) if self.ahead else x]


@pytest.mark.parametrize("ahead", [False, True])
def test_the_causality_probe_catches_a_model_that_reads_the_future(prepared, tokenizer, ahead):
    torch.manual_seed(0)
    probe = prepare.causality_probe(Lookahead(tokenizer.get_vocab_size(), ahead), tokenizer, batch_size=4)
    assert probe["ok"] is (not ahead)
    assert probe["position"] == prepare.MAX_SEQ_LEN // 2
    assert (probe["max_change"] > 0.1) if ahead else probe["max_change"] == 0.0


def test_a_finished_runs_number_cannot_be_supplied_by_the_caller(tmp_path):
    import sys
    hook = sys.excepthook
    logger = prepare.RunLogger({}, run_dir=tmp_path)
    sys.excepthook = hook
    for fields in ({"val_bpb": 0.5}, {}):
        with pytest.raises(prepare.HarnessError, match="val_bpb is the harness's"):
            logger.finish("ok", **fields)
    for field in ("val_bpb", "causality", "device"):
        with pytest.raises(prepare.HarnessError, match="written by the harness, not by train.py"):
            logger.set(**{field: 0.5})
    assert not (tmp_path / "run_summary.json").exists()
