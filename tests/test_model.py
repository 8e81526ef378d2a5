"""train.py's model and optimizer, taken apart structurally (see conftest.load_train_definitions)."""

import math

import pytest
import torch

from train_defs import load_train_definitions


def tiny_config(defs, vocab=64, attention="sdpa", n_layer=2, window=8, T=32):
    return defs["GPTConfig"](sequence_len=T, vocab_size=vocab, n_layer=n_layer, n_head=2, n_embd=32,
                             window_pattern="SL", short_window=window, softcap=15.0, ve_gate_channels=8,
                             attention=attention)


def make_model(defs, **kw):
    torch.manual_seed(0)
    config = tiny_config(defs, **kw)
    model = defs["GPT"](config)
    model.init_weights()
    model.prepare_attention([config.sequence_len])
    return model


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (3, 96, 48)])
def test_polar_express_is_near_orthogonal(train_defs, shape):
    torch.manual_seed(0)
    G = torch.randn(*shape)
    X = train_defs["polar_express"](G)
    sv = torch.linalg.svdvals(X)
    assert sv.min() > 0.8 and sv.max() < 1.2  # singular values pushed close to 1
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    cosine = (X * polar).sum() / (X.norm() * polar.norm())
    assert cosine > 0.99  # and it is the polar factor of G, not just any orthogonal matrix


def test_polar_express_flattens_an_ill_conditioned_spectrum(train_defs):
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(48, 48))
    V, _ = torch.linalg.qr(torch.randn(24, 24))
    S = torch.logspace(-1, 1, 24)  # condition number 100
    G = U[:, :24] @ torch.diag(S) @ V.T
    sv = torch.linalg.svdvals(train_defs["polar_express"](G))
    assert sv.max() / sv.min() < 1.5


def test_normuon_keeps_the_update_norm(train_defs):
    torch.manual_seed(0)
    X = torch.randn(2, 16, 8)
    second = torch.zeros(2, 16, 1)
    out = train_defs["normuon"](X, second, 0.95)
    torch.testing.assert_close(out.norm(dim=(-2, -1)), X.norm(dim=(-2, -1)), rtol=1e-4, atol=1e-4)
    assert second.abs().sum() > 0  # the running second moment was updated in place


def test_forward_shapes_and_initial_loss(train_defs):
    model = make_model(train_defs)
    idx = torch.randint(0, 64, (2, 32))
    logits = model(idx)
    assert logits.shape == (2, 32, 64)
    assert logits.abs().max() <= 15.0  # soft-capped
    loss = model(idx, idx)
    assert abs(loss.item() - math.log(64)) < 0.5  # tiny lm_head init: close to a uniform guess
    per_token = model(idx, idx, reduction="none")
    assert per_token.shape == (64,)


def test_optimizer_lowers_loss(train_defs):
    defs = dict(train_defs)
    model = make_model(defs)
    optimizer = defs["build_optimizer"](model, 32)
    kinds = {g["kind"] for g in optimizer.param_groups}
    assert kinds == {"muon", "adamw"}
    muon_params = {id(p) for g in optimizer.param_groups if g["kind"] == "muon" for p in g["params"]}
    assert id(model.blocks[0].attn.c_q.weight) in muon_params and id(model.wte.weight) not in muon_params
    torch.manual_seed(1)
    data = torch.randint(0, 64, (4, 33))
    x, y = data[:, :-1], data[:, 1:]
    losses = []
    for _ in range(40):
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_sliding_window_limits_what_a_layer_sees(train_defs):
    """With a single S layer of window 8, position t ignores tokens at t-8 and earlier."""
    model = make_model(train_defs, n_layer=1, window=8)
    model.windows = [8]  # the last layer is normally forced to full context; test the S path itself
    model.prepare_attention([32])
    idx = torch.randint(0, 64, (1, 32))
    changed = idx.clone()
    changed[0, 0] = (idx[0, 0] + 1) % 64
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert not torch.allclose(a[0, :8], b[0, :8])        # inside the window: affected
    torch.testing.assert_close(a[0, 8:], b[0, 8:])        # outside it: not


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_matches_sdpa():
    """The CUDA path (flex_attention with block masks) computes the same function as the CPU path."""
    defs = load_train_definitions()
    sdpa = make_model(defs, attention="sdpa", T=256, window=128)
    flex = make_model(defs, attention="flex", T=256, window=128)
    flex.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 64, (2, 256))
    with torch.no_grad():
        torch.testing.assert_close(flex(idx), sdpa(idx), rtol=1e-4, atol=1e-4)
    assert type(flex.masks[256][0]).__name__ == "BlockMask"  # really flex's block mask, not the SDPA one
    assert isinstance(sdpa.masks[256][0], torch.Tensor) and flex.masks[256][1] is None  # last layer: causal


def test_schedules(train_defs):
    lr = train_defs["lr_multiplier"]
    assert lr(0.0) == 1.0 and lr(0.49) == 1.0  # WARMUP_RATIO 0, WARMDOWN_RATIO 0.5
    assert lr(0.75) == pytest.approx(0.5) and lr(1.0) == pytest.approx(0.0)
    mom = train_defs["muon_momentum"]
    assert mom(0) == train_defs["MUON_MOMENTUM_START"]
    assert mom(10_000) == train_defs["MUON_MOMENTUM_END"]
    wd = train_defs["weight_decay"]
    assert wd(0.0) == train_defs["WEIGHT_DECAY"] and wd(1.0) == 0.0
