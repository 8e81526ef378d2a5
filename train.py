"""
Pretrain a small GPT for a fixed time budget and report val_bpb: the one file the agent edits.
Model: rotary embeddings, QK-norm, RMSNorm, ReLU^2 MLP, value embeddings with input-dependent
gates, per-layer residual scalars, logit soft-capping, a sliding/full attention window pattern.
Optimizer: Muon (Polar Express, NorMuon, cautious weight decay) for the matrices, AdamW for the
rest. Instrumentation: a few calls on `run`, the harness's record of this run (harness/runlog.py).
Usage: uv run launch.py        (SEED=7 uv run launch.py ... for another seed)
"""

import contextlib
import gc
import math
import os
import sys
import time
from dataclasses import dataclass

from prepare import MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, make_dataloader, start_run

# First thing: a fresh run (the previous run's files deleted, so a crash from here on can never
# leave an earlier result behind), the watchdog, and the device.
run = start_run(globals())

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

# ---------------------------------------------------------------------------
# Hyperparameters (every UPPER_CASE name is captured into run_summary.json)
# ---------------------------------------------------------------------------

SEED = int(os.environ.get("SEED", 42))  # initialisation and data order; another one measures noise

# Model
DEPTH = 8                  # transformer layers: the main size knob
ASPECT_RATIO = 64          # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128
WINDOW_PATTERN = "SSSL"    # attention window per layer, tiled: S = SHORT_WINDOW, L = full (last: L)
SHORT_WINDOW = 1024        # tokens seen by an S layer
LOGIT_SOFTCAP = 15.0       # logits = cap * tanh(logits / cap)
VE_GATE_CHANNELS = 32      # input channels that drive the value-embedding gate

# Optimization
TOTAL_BATCH_SIZE = 2**19   # tokens per optimizer step
DEVICE_BATCH_SIZE = 128    # rows per micro-batch; gradient accumulation makes up TOTAL_BATCH_SIZE
SEQ_LEN = MAX_SEQ_LEN      # training context
MATRIX_LR = 0.04           # Muon
EMBEDDING_LR = 0.6         # AdamW, token and value embeddings (scaled by 1/sqrt(model_dim/768))
UNEMBEDDING_LR = 0.004     # AdamW, lm_head (same scaling)
SCALAR_LR = 0.5            # AdamW, per-layer residual scalars
WEIGHT_DECAY = 0.2         # Muon cautious weight decay, decayed linearly to 0 over the run
ADAM_BETAS = (0.8, 0.95)
X0_ADAM_BETAS = (0.96, 0.95)  # the x0 lambdas' AdamW betas: a slower average, as autoresearch's
WARMUP_RATIO = 0.0         # fraction of the budget spent warming up the lr
WARMDOWN_RATIO = 0.5       # fraction of the budget spent decaying it
FINAL_LR_FRAC = 0.0        # lr multiplier at the end of the warmdown
MUON_MOMENTUM_START = 0.85
MUON_MOMENTUM_END = 0.95
MUON_MOMENTUM_WARMUP_STEPS = 300

# Instrumentation and safety
VAL_EVERY = 0.1            # fraction of the budget between validation-curve points
LAYER_STATS_EVERY = 50     # steps between per-layer statistics
CLOCK_WARMUP_STEPS = 3     # first steps off the training clock: allocations (compiling is before)
EVAL_BATCH_SIZE = 128      # rows per evaluation batch (speed only: the metric does not change)
LOSS_EXPLODE_FACTOR = 2.0  # stop as "nan" once the loss exceeds this multiple of ln(vocab)

# ---------------------------------------------------------------------------
# Device
# ---------------------------------------------------------------------------

# The fast path is the CUDA code: bf16 autocast, torch.compile of the model and the optimizer step,
# flex_attention for the sliding windows. AUTORESEARCH_CPU_FAST_PATH=1 runs it on CPU, compiled with
# aot_eager (it traces like inductor), so that the tests catch a change that breaks the GPU run.
FAST_PATH = True
COMPILE_BACKEND = "inductor"
COMPUTE_DTYPE = torch.bfloat16  # of q, k, v, the rotary tables and the embedding outputs
device = run.device  # cuda when usable; the run stops with the cause and the fix on a GPU machine
if device.type != "cuda":  # whose CUDA is unusable
    FAST_PATH = run.fast_path
    COMPILE_BACKEND = "aot_eager"
    COMPUTE_DTYPE = torch.bfloat16 if FAST_PATH else torch.float32
    # No CUDA: a small configuration that trains in minutes on a laptop CPU: a smoke test
    print(f"NOTE: no CUDA GPU found; running the small {device.type.upper()} configuration " + (
        "(the CUDA code path: bf16, aot_eager compile, flex_attention). For tests" if FAST_PATH
        else "(SDPA attention, fp32, no compile). For trying the loop") + ", not for research.")
    DEPTH = 2
    HEAD_DIM = 64
    SHORT_WINDOW = 64
    TOTAL_BATCH_SIZE = 8 * 256
    DEVICE_BATCH_SIZE = 8
    SEQ_LEN = 256
    LAYER_STATS_EVERY = 10
    CLOCK_WARMUP_STEPS = 2
    EVAL_BATCH_SIZE = 4
    MUON_MOMENTUM_WARMUP_STEPS = 50
torch.manual_seed(SEED)
torch.set_float32_matmul_precision("high")
autocast = (torch.amp.autocast(device_type=device.type, dtype=torch.bfloat16) if FAST_PATH
            else contextlib.nullcontext())
synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
# flex_attention (fused, with block-sparse sliding windows) on the fast path; SDPA with dense
# masks elsewhere, because flex_attention has no backward on CPU.
ATTENTION_BACKEND = "flex" if FAST_PATH else "sdpa"

# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


@dataclass
class GPTConfig:
    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    window_pattern: str
    short_window: int
    softcap: float
    ve_gate_channels: int
    attention: str = "sdpa"
    dtype: torch.dtype = torch.float32  # of q, k, v, the rotary tables and the embedding outputs


def norm(x):  # in x's dtype: since torch 2.12, CUDA autocast would return rms_norm in fp32
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)


def has_ve(layer_idx, n_layer):
    """Value embeddings on every other layer, always including the last."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def window_sizes(config):
    pattern = config.window_pattern.upper()
    assert set(pattern) <= {"S", "L"}, \
        f"WINDOW_PATTERN may contain only S and L, got {config.window_pattern!r}"
    sizes = [config.short_window if pattern[i % len(pattern)] == "S" else config.sequence_len
             for i in range(config.n_layer)]
    sizes[-1] = config.sequence_len  # the last layer always sees the full context
    return sizes


def sliding_window_mask(T, window, device):
    i = torch.arange(T, device=device)
    return (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)


def attend(q, k, v, mask):
    """Causal attention of (B, H, T, D) tensors; `mask` is one of GPT.prepare_attention's: None
    (plain causal), a dense boolean mask (SDPA) or a flex_attention BlockMask."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return flex_attention(q, k, v, block_mask=mask)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dtype = config.dtype
        self.ve_gate_channels = config.ve_gate_channels
        self.ve_gate = (nn.Linear(config.ve_gate_channels, config.n_head, bias=False)
                        if has_ve(layer_idx, config.n_layer) else None)

    def forward(self, x, ve, cos_sin, attn_mask):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        if ve is not None:  # input-dependent gate in (0, 2) on the value embedding, per head
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_head, self.head_dim)
        cos, sin = cos_sin
        q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))
        # the value-embedding sum is fp32 under autocast: attention gets one dtype
        q, k, v = (t.to(self.dtype).transpose(1, 2) for t in (q, k, v))
        y = attend(q, k, v, attn_mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, attn_mask):
        x = x + self.attn(norm(x), ve, cos_sin, attn_mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, config.n_embd)
                                           for i in range(config.n_layer)
                                           if has_ve(i, config.n_layer)})
        self.windows = window_sizes(config)
        head_dim = config.n_embd // config.n_head
        rotary_shape = (1, config.sequence_len, 1, head_dim // 2)
        for name in ("cos", "sin"):  # the rotary tables, filled by init_weights on the device
            self.register_buffer(name, torch.empty(rotary_shape, dtype=config.dtype), False)
        self.masks = {}  # T -> one attention mask per layer, built before compiling

    @torch.no_grad()
    def init_weights(self):
        s = 3**0.5 * self.config.n_embd**-0.5  # uniform with the std of N(0, 1/n_embd)
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)  # every block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for emb in self.value_embeds.values():
            nn.init.uniform_(emb.weight, -s, s)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        # the rotary tables are buffers: (re)computed here, on the real device
        head_dim, dev = self.cos.size(-1) * 2, self.cos.device
        inv_freq = 10000 ** -(torch.arange(0, head_dim, 2, device=dev).float() / head_dim)
        freqs = torch.outer(torch.arange(self.config.sequence_len, dtype=torch.float32, device=dev),
                            inv_freq)
        self.cos.copy_(freqs.cos()[None, :, None, :])
        self.sin.copy_(freqs.sin()[None, :, None, :])

    def prepare_attention(self, seq_lens):
        """Build each layer's attention mask for every sequence length the run will use. Call it
        before the first forward (and before torch.compile): the forward only looks masks up, so
        tracing never builds one."""
        for T in seq_lens:
            by_window = {}
            for window in set(self.windows):
                if window >= T:
                    by_window[window] = None  # plain causal attention
                elif self.config.attention == "flex":
                    by_window[window] = create_block_mask(
                        lambda b, h, q, kv, w=window: (q >= kv) & (q - kv < w), None, None, T, T,
                        device=self.cos.device)
                else:
                    by_window[window] = sliding_window_mask(T, window, self.cos.device)
            self.masks[T] = tuple(by_window[w] for w in self.windows)

    def num_flops_per_token(self, T):
        """Forward + backward FLOPs per token: 6 per matmul weight, plus attention's."""
        n_matmul = sum(p.numel() for n, p in self.named_parameters()
                       if p.ndim == 2 and not n.startswith(("wte", "value_embeds")))
        head_dim = self.config.n_embd // self.config.n_head
        attn = sum(12 * self.config.n_head * head_dim * min(w, T) for w in self.windows)
        return 6 * n_matmul + attn

    def forward(self, idx, targets=None, reduction="mean"):
        B, T = idx.shape
        if T not in self.masks:
            raise ValueError(f"no attention masks for sequence length {T}: call "
                             f"model.prepare_attention([{T}]) first")
        masks = self.masks[T]
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        dtype = self.config.dtype
        x = x0 = norm(self.wte(idx).to(dtype))
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, masks[i])
        logits = self.lm_head(norm(x)).float()
        logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               reduction=reduction)


# ---------------------------------------------------------------------------
# Optimizer: Muon for the matrices, AdamW for everything else
# ---------------------------------------------------------------------------

# Polar Express (Amsel et al. 2025, arXiv:2505.16932): per-iteration quintic coefficients that
# drive the singular values to 1 faster than fixed Newton-Schulz; they include a 2 % safety margin.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def polar_express(G, steps=5):
    """Approximate orthogonal polar factor U V^T of a batch of matrices G = U S V^T."""
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)  # spectral <= Frobenius norm < 1
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


def normuon(X, second_moment, beta2, active=1.0):
    """NorMuon: normalise each neuron's update by a running RMS, keeping the update's overall
    norm. `active` (n, 1, 1) is 0 for a matrix without a gradient: its running RMS stays put."""
    red_dim = -1 if X.size(-2) >= X.size(-1) else -2
    n = X.size(red_dim)
    X = X.float()
    v_mean = X.square().mean(dim=red_dim, keepdim=True)
    second_moment.add_((1 - beta2) * active * (v_mean - second_moment))
    step_size = second_moment.clamp_min(1e-10).rsqrt()
    norm_before = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    norm_after = ((v_mean * step_size.square()).sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    return X * step_size * (norm_before / norm_after.clamp_min(1e-10))


def adamw_update(params, grads, active, exp_avgs, exp_avg_sqs, step, lr, weight_decay,
                 beta1: float, beta2: float, eps: float):
    """AdamW on a group's parameters, in place; a parameter whose `active` entry is 0 (no
    gradient this step) and its state stay as they are. step, lr and weight_decay are 0-D
    tensors, so the compiled version is not recompiled each time the schedule changes them."""
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        on = active[i]
        m.add_((1 - beta1) * on * (g - m))
        v.add_((1 - beta2) * on * (g.square() - v))
        denom = (v / (1 - beta2 ** step)).sqrt() + eps
        p.mul_(1 - lr * weight_decay * on)
        p.sub_(on * lr / (1 - beta1 ** step) * m / denom)


def muon_update(params, grads, active, momentum_buffer, second_moment, momentum, lr,
                weight_decay, beta2: float, ns_steps: int):
    """Muon on a group of same-shape matrices, in place: Nesterov momentum, Polar Express,
    NorMuon, cautious weight decay; a matrix whose `active` entry is 0 and its state stay as they
    are. momentum, lr and weight_decay are 0-D tensors (see adamw_update)."""
    on = active.view(-1, 1, 1)
    g = torch.stack(grads).float()
    momentum_buffer.add_((1 - momentum) * on * (g - momentum_buffer))
    update = normuon(polar_express(g.lerp_(momentum_buffer, momentum), ns_steps), second_moment,
                     beta2, on)
    rows, cols = update.shape[-2:]
    lr = lr * max(1.0, rows / cols) ** 0.5
    weights = torch.stack(params).float()
    # cautious weight decay: decay only the coordinates where the update already shrinks the weight
    weights = weights - on * lr * (weight_decay * weights * (update * weights > 0) + update)
    for p, w in zip(params, weights.unbind(0)):
        p.copy_(w)


class MuonAdamW(torch.optim.Optimizer):
    """Groups of kind "muon" hold same-shape matrices updated together; kind "adamw" groups are
    AdamW. With compile_backend (the fast path), each group's update is one compiled graph
    instead of hundreds of small kernels, compiled once per group before the training clock. A
    parameter without a gradient is masked, not left out, so the graph never changes shape."""

    def __init__(self, param_groups, compile_backend=None):
        super().__init__(param_groups, {})
        if compile_backend:
            # one graph per group shape, and fullgraph fails hard past the recompile limit (8)
            limits = torch._dynamo.config
            limits.recompile_limit = max(limits.recompile_limit, len(self.param_groups) + 1)
        fuse = ((lambda f: torch.compile(f, backend=compile_backend, dynamic=False, fullgraph=True))
                if compile_backend else (lambda f: f))
        self._adamw, self._muon = fuse(adamw_update), fuse(muon_update)
        # the schedule's values, as 0-D CPU tensors (see adamw_update)
        self._step, self._lr, self._wd, self._momentum = (torch.zeros(()) for _ in range(4))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params, state = group["params"], self.state[group["params"][0]]
            flags = [float(p.grad is not None) for p in params]
            if not any(flags):
                continue
            if state.get("flags") != flags:  # copied to the device only when it changes
                state.update(flags=flags, active=torch.tensor(flags, device=params[0].device))
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            self._lr.fill_(group["lr"])
            self._wd.fill_(group["weight_decay"])
            kind = self._step_muon if group["kind"] == "muon" else self._step_adamw
            kind(group, params, grads, state["active"])

    def _step_adamw(self, group, params, grads, active):
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if "exp_avg" not in state:
                state.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        states[0]["step"] = states[0].get("step", 0) + 1  # the group's: reset with the state
        self._step.fill_(states[0]["step"])
        beta1, beta2 = group["betas"]
        self._adamw(params, grads, active, [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states], self._step, self._lr, self._wd, beta1, beta2,
                    group["eps"])

    def _step_muon(self, group, params, grads, active):
        state, (rows, cols) = self.state[params[0]], params[0].shape
        if "momentum" not in state:
            state["momentum"] = torch.zeros((len(params), rows, cols), device=params[0].device)
            state["second_moment"] = state["momentum"].new_zeros(
                (len(params), rows, 1) if rows >= cols else (len(params), 1, cols))
        self._momentum.fill_(group["momentum"])
        self._muon(params, grads, active, state["momentum"], state["second_moment"],
                   self._momentum, self._lr, self._wd, group["beta2"], group["ns_steps"])


def build_optimizer(model, model_dim, compile_backend=None):
    scale = (model_dim / 768) ** -0.5  # AdamW lrs were tuned at width 768
    adam = dict(kind="adamw", eps=1e-10, weight_decay=0.0)
    groups = [
        dict(params=[model.lm_head.weight], lr=UNEMBEDDING_LR * scale, betas=ADAM_BETAS, **adam),
        dict(params=[model.wte.weight], lr=EMBEDDING_LR * scale, betas=ADAM_BETAS, **adam),
        dict(params=list(model.value_embeds.parameters()), lr=EMBEDDING_LR * scale,
             betas=ADAM_BETAS, **adam),
        dict(params=[model.resid_lambdas], lr=SCALAR_LR * 0.01, betas=ADAM_BETAS, **adam),
        dict(params=[model.x0_lambdas], lr=SCALAR_LR, betas=X0_ADAM_BETAS, **adam),
    ]
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    for shape in sorted({tuple(p.shape) for p in matrices}):
        groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape],
                           lr=MATRIX_LR, momentum=MUON_MOMENTUM_START, ns_steps=5, beta2=0.95,
                           weight_decay=WEIGHT_DECAY))
    optimizer = MuonAdamW([g for g in groups if g["params"]], compile_backend)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


# Schedules, driven by the fraction of the time budget used
def lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return (progress + 1e-8) / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1.0 - cooldown) * FINAL_LR_FRAC


def muon_momentum(step):
    frac = min(step / MUON_MOMENTUM_WARMUP_STEPS, 1.0)
    return (1 - frac) * MUON_MOMENTUM_START + frac * MUON_MOMENTUM_END


def weight_decay(progress):
    return WEIGHT_DECAY * (1.0 - progress)


# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

tokenizer = Tokenizer.from_directory()
vocab_size = tokenizer.get_vocab_size()
model_dim = math.ceil(DEPTH * ASPECT_RATIO / HEAD_DIM) * HEAD_DIM
config = GPTConfig(sequence_len=max(SEQ_LEN, MAX_SEQ_LEN), vocab_size=vocab_size, n_layer=DEPTH,
                   n_head=model_dim // HEAD_DIM, n_embd=model_dim, window_pattern=WINDOW_PATTERN,
                   short_window=SHORT_WINDOW, softcap=LOGIT_SOFTCAP, dtype=COMPUTE_DTYPE,
                   ve_gate_channels=VE_GATE_CHANNELS, attention=ATTENTION_BACKEND)
model = GPT(config).to(device)
model.init_weights()
model.prepare_attention(sorted({SEQ_LEN, MAX_SEQ_LEN}))  # training and evaluation lengths
num_params = sum(p.numel() for p in model.parameters())
flops_per_token = model.num_flops_per_token(SEQ_LEN)
optimizer = build_optimizer(model, model_dim, COMPILE_BACKEND if FAST_PATH else None)
compiled = torch.compile(model, backend=COMPILE_BACKEND, dynamic=False) if FAST_PATH else model

grad_accum, rest = divmod(TOTAL_BATCH_SIZE, DEVICE_BATCH_SIZE * SEQ_LEN)
assert rest == 0, "TOTAL_BATCH_SIZE must be a multiple of DEVICE_BATCH_SIZE * SEQ_LEN"
train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, SEQ_LEN, "train", device=device,
                               seed=SEED)
x, y, epoch = next(train_loader)
loss_limit = LOSS_EXPLODE_FACTOR * math.log(vocab_size)
print(f"attention: {ATTENTION_BACKEND} | params: {num_params / 1e6:.1f}M | dim {model_dim} x "
      f"{DEPTH} layers | batch {TOTAL_BATCH_SIZE:,} tokens ({grad_accum} x {DEVICE_BATCH_SIZE} x "
      f"{SEQ_LEN}) | budget {TIME_BUDGET:.0f}s", flush=True)


def warm_up_compilation():
    """Compile every graph the run uses before the training clock starts: a training micro-step
    and an optimizer step (both undone afterwards, so the run starts from the initial weights and
    state), then each batch shape of the evaluations."""
    initial = [p.detach().clone() for p in model.parameters()]
    with autocast:
        warm_loss = compiled(x, y)
    warm_loss.backward()
    optimizer.step()
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), initial):
            p.copy_(p0)
    optimizer.state.clear()
    model.zero_grad(set_to_none=True)
    model.eval()
    with autocast:
        run.warm_up_evaluation(compiled, EVAL_BATCH_SIZE)
    model.train()


if FAST_PATH:
    warm_up_compilation()

# ---------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------

run.start_clock(model, TOTAL_BATCH_SIZE, flops_per_token)
step = 0
training_time = 0.0        # the clock TIME_BUDGET is measured against
next_val = VAL_EVERY

while True:
    synchronize()
    t0 = time.time()
    for _ in range(grad_accum):
        with autocast:
            loss = compiled(x, y)
        train_loss = loss.detach()
        (loss / grad_accum).backward()
        x, y, epoch = next(train_loader)

    progress = min(training_time / TIME_BUDGET, 1.0)
    lrm, momentum, wd = lr_multiplier(progress), muon_momentum(step), weight_decay(progress)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"], group["weight_decay"] = momentum, wd
    with run.layer_stats(model, step % LAYER_STATS_EVERY == 0) as stats:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    loss_f = train_loss.item()  # the step's one sync
    synchronize()
    dt = time.time() - t0

    if not all(map(math.isfinite, [loss_f, *stats.values()])) or loss_f > loss_limit:
        message = f"loss {loss_f} at step {step} is not finite or above {loss_limit:.1f} (diverged)"
        run.fail("nan", error=message)
        print(f"\nFAIL: {message}", flush=True)
        sys.exit(1)

    if step >= CLOCK_WARMUP_STEPS:
        training_time += dt
    progress = min(training_time / TIME_BUDGET, 1.0)
    done = step >= CLOCK_WARMUP_STEPS and training_time >= TIME_BUDGET
    record = {"step": step, "time_s": training_time, "train/loss": loss_f,
              "train/lr_multiplier": lrm, "train/muon_momentum": momentum,
              "train/weight_decay": wd, "perf/step_time_ms": dt * 1000, **stats}
    if progress >= next_val or done:  # validation-curve point, off the training clock
        model.eval()
        with autocast:
            record.update(run.validation_point(compiled, EVAL_BATCH_SIZE))
        model.train()
        next_val = (math.floor(progress / VAL_EVERY) + 1) * VAL_EVERY
    run.log_step(record)

    if step == 0:  # after the first step's allocations: no GC pauses in the timed loop
        gc.collect()
        gc.freeze()
        gc.disable()
    step += 1
    if done:
        break

# ---------------------------------------------------------------------------
# The end: the harness evaluates the model itself, writes the summary and prints the final block
# ---------------------------------------------------------------------------

model.eval()
with autocast:
    run.finish(compiled, EVAL_BATCH_SIZE)
