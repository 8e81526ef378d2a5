"""evaluate_bpb, the fixed metric, against a hand computation on toy models."""

import math

import pytest
import torch
import torch.nn as nn

import prepare


class ToyModel(nn.Module):
    """Per-token loss is a known function of the target id, so the answer can be computed by hand."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives evaluate_bpb a device to read

    def forward(self, x, y, reduction="none"):
        assert reduction == "none"
        return (y % 7).float() * 0.25 + 0.5 + self.anchor


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
    expected = hand_bpb(tokenizer, rows, lambda t: (t % 7) * 0.25 + 0.5)
    got = prepare.evaluate_bpb(ToyModel(), tokenizer, batch_size=3)
    assert got == pytest.approx(expected, rel=1e-9)


def test_independent_of_batch_size(prepared, tokenizer):
    values = {prepare.evaluate_bpb(ToyModel(), tokenizer, batch_size=b) for b in (1, 2, 8)}
    assert max(values) - min(values) < 1e-9


def test_curve_slice_is_smaller_and_fixed(prepared, tokenizer):
    curve = prepare.evaluate_bpb(ToyModel(), tokenizer, batch_size=2, curve=True)
    rows = prepare.val_rows(tokenizer, prepare.CPU_VAL_CURVE_TOKENS // prepare.MAX_SEQ_LEN)
    assert curve == pytest.approx(hand_bpb(tokenizer, rows, lambda t: (t % 7) * 0.25 + 0.5), rel=1e-9)


def test_uniform_model_scores_log_vocab_per_token(prepared, tokenizer):
    class Uniform(ToyModel):
        def forward(self, x, y, reduction="none"):
            logits = torch.zeros(*y.shape, tokenizer.get_vocab_size()) + self.anchor
            return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")

    n_rows = prepare.CPU_EVAL_TOKENS // prepare.MAX_SEQ_LEN
    rows = prepare.val_rows(tokenizer, n_rows)
    expected = hand_bpb(tokenizer, rows, lambda t: math.log(tokenizer.get_vocab_size()))
    assert prepare.evaluate_bpb(Uniform(), tokenizer, batch_size=4) == pytest.approx(expected, rel=1e-6)


def test_val_loss_is_mean_nats_per_counted_token(prepared, tokenizer):
    n_rows = prepare.CPU_EVAL_TOKENS // prepare.MAX_SEQ_LEN
    rows = prepare.val_rows(tokenizer, n_rows)
    bos = tokenizer.get_bos_token_id()
    targets = [t for row in rows.tolist() for t in row[1:] if t != bos]
    expected = sum((t % 7) * 0.25 + 0.5 for t in targets) / len(targets)
    bpb, loss = prepare.evaluate_val(ToyModel(), tokenizer, batch_size=3)
    assert loss == pytest.approx(expected, rel=1e-9)
    assert bpb == prepare.evaluate_bpb(ToyModel(), tokenizer, batch_size=3)
