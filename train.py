"""
Pretrain a small GPT for a fixed time budget and report val_bpb: the one file the agent edits.

Model: rotary embeddings, QK-norm, RMSNorm, ReLU^2 MLP, value embeddings with input-dependent
gates, per-layer residual scalars, logit soft-capping, a sliding/full attention window pattern.
Optimizer: Muon (Polar Express, NorMuon variance normalisation, cautious weight decay) for the
matrices, AdamW for embeddings, head and scalars.
Instrumentation: one metrics.jsonl line per step, a validation curve, per-layer statistics, and
run_summary.json at the end, all through the logger in prepare.py (see schema.py for the keys).

Usage: uv run train.py > run.log 2>&1        (SEED=7 uv run train.py for another seed)
"""

import time

t_start = time.time()  # before the heavy imports: total_seconds is the whole process

import contextlib
import gc
import math
import os
import sys
from dataclasses import dataclass

import schema
from prepare import (MAX_SEQ_LEN, TIME_BUDGET, HarnessError, LayerStats, RunLogger, Tokenizer, Watchdog,
                     autodetect_device, compile_counters, data_label, device_description, evaluate_val,
                     load_manifest, make_dataloader, peak_flops, peak_memory_mb, synchronize,
                     warm_up_evaluation)

# First thing: delete the previous run's summary and start a fresh metrics.jsonl, so a crash
# from here on can never leave an earlier result behind.
logger = RunLogger(globals(), t_start=t_start)

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# ---------------------------------------------------------------------------
# Hyperparameters (every UPPER_CASE name is captured into run_summary.json)
# ---------------------------------------------------------------------------

SEED = int(os.environ.get("SEED", 42))  # initialisation and data order; rerun a commit with another to measure noise

# Model
DEPTH = 8                  # transformer layers: the main size knob
ASPECT_RATIO = 64          # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128
WINDOW_PATTERN = "SSSL"    # per-layer attention window, tiled over layers (S = SHORT_WINDOW, L = full); last layer is always L
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
WARMUP_RATIO = 0.0         # fraction of the budget spent warming up the lr
WARMDOWN_RATIO = 0.5       # fraction of the budget spent decaying it
FINAL_LR_FRAC = 0.0        # lr multiplier at the end of the warmdown
MUON_MOMENTUM_START = 0.85
MUON_MOMENTUM_END = 0.95
MUON_MOMENTUM_WARMUP_STEPS = 300

# Instrumentation and safety
VAL_EVERY = 0.1            # fraction of the budget between validation-curve points
LAYER_STATS_EVERY = 50     # steps between per-layer statistics
CLOCK_WARMUP_STEPS = 3     # first steps kept off the training clock: one-time allocations (compilation is before it)
EVAL_BATCH_SIZE = 128      # rows per evaluation batch (speed only: the metric does not depend on it)
LOSS_EXPLODE_FACTOR = 2.0  # stop as "nan" once the loss exceeds this multiple of a uniform guess, ln(vocab)
PRINT_EVERY_S = 5.0        # progress-line cadence when stdout is a file, so run.log stays short and readable

# ---------------------------------------------------------------------------
# Device
# ---------------------------------------------------------------------------

# The fast path is the CUDA code: bf16 autocast, torch.compile of the model and of the optimizer
# step, flex_attention for the sliding windows. AUTORESEARCH_CPU_FAST_PATH=1 runs that same code on
# CPU, compiled with aot_eager (it traces like inductor and runs plain kernels), so that the tests
# catch a change that would break the GPU run.
FAST_PATH = True
COMPILE_BACKEND = "inductor"
COMPUTE_DTYPE = torch.bfloat16  # of q, k, v, the rotary tables and the embedding outputs
device = autodetect_device()    # stops with the cause and the fix on a GPU machine whose CUDA is unusable
if device.type != "cuda":
    FAST_PATH = os.environ.get("AUTORESEARCH_CPU_FAST_PATH") == "1"
    COMPILE_BACKEND = "aot_eager"
    COMPUTE_DTYPE = torch.bfloat16 if FAST_PATH else torch.float32
    # No CUDA: a small configuration that trains in minutes on a laptop CPU. Its numbers are
    # a smoke test of the loop, not comparable with GPU runs.
    print(f"NOTE: no CUDA GPU found; running the small {device.type.upper()} configuration "
          + ("(the CUDA code path: bf16, aot_eager compile, flex_attention). For tests, not for research."
             if FAST_PATH else "(SDPA attention, fp32, no compile). For trying the loop, not for research."),
          flush=True)
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


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def has_ve(layer_idx, n_layer):
    """Value embeddings on every other layer, always including the last."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def window_sizes(config):
    pattern = config.window_pattern.upper()
    assert set(pattern) <= {"S", "L"}, f"WINDOW_PATTERN may contain only S and L, got {config.window_pattern!r}"
    sizes = [config.short_window if pattern[i % len(pattern)] == "S" else config.sequence_len
             for i in range(config.n_layer)]
    sizes[-1] = config.sequence_len  # the last layer always sees the full context
    return sizes


def sliding_window_mask(T, window, device):
    i = torch.arange(T, device=device)
    return (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)


def attend(q, k, v, mask):
    """Causal attention of (B, H, T, D) tensors; `mask` is one of GPT.prepare_attention's: None (plain
    causal), a dense boolean mask (SDPA) or a flex_attention BlockMask."""
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
        # autocast returns rms_norm (and the fp32 value-embedding sum) in fp32: attention gets one dtype
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
                                           for i in range(config.n_layer) if has_ve(i, config.n_layer)})
        self.windows = window_sizes(config)
        head_dim = config.n_embd // config.n_head
        rotary_shape = (1, config.sequence_len, 1, head_dim // 2)
        self.register_buffer("cos", torch.empty(rotary_shape, dtype=config.dtype), persistent=False)
        self.register_buffer("sin", torch.empty(rotary_shape, dtype=config.dtype), persistent=False)
        self.masks = {}  # T -> one attention mask per layer, built before compiling (prepare_attention)

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
        head_dim = self.cos.size(-1) * 2  # rotary tables: buffers, so they are (re)computed here on the real device
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=self.cos.device) / head_dim))
        freqs = torch.outer(torch.arange(self.config.sequence_len, dtype=torch.float32, device=self.cos.device), inv_freq)
        self.cos.copy_(freqs.cos()[None, :, None, :])
        self.sin.copy_(freqs.sin()[None, :, None, :])

    def prepare_attention(self, seq_lens):
        """Build each layer's attention mask for every sequence length the run will use. Call it before
        the first forward (and before torch.compile): the forward only looks masks up, so tracing never
        builds one."""
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
        """Forward + backward FLOPs per token: 6 per matmul weight plus attention scores over each layer's window."""
        n_matmul = sum(p.numel() for n, p in self.named_parameters()
                       if p.ndim == 2 and not n.startswith(("wte", "value_embeds")))
        head_dim = self.config.n_embd // self.config.n_head
        attn = sum(12 * self.config.n_head * head_dim * min(w, T) for w in self.windows)
        return 6 * n_matmul + attn

    def forward(self, idx, targets=None, reduction="mean"):
        B, T = idx.shape
        if T not in self.masks:
            raise ValueError(f"no attention masks for sequence length {T}: call model.prepare_attention([{T}]) first")
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
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)


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
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)  # spectral norm <= Frobenius norm < 1
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


def normuon(X, second_moment, beta2):
    """NorMuon: normalise each neuron's update by a running RMS, keeping the update's overall norm."""
    red_dim = -1 if X.size(-2) >= X.size(-1) else -2
    n = X.size(red_dim)
    X = X.float()
    v_mean = X.square().mean(dim=red_dim, keepdim=True)
    second_moment.lerp_(v_mean, 1 - beta2)
    step_size = second_moment.clamp_min(1e-10).rsqrt()
    norm_before = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    norm_after = ((v_mean * step_size.square()).sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    return X * step_size * (norm_before / norm_after.clamp_min(1e-10))


def adamw_update(params, grads, exp_avgs, exp_avg_sqs, step, lr, weight_decay, beta1: float, beta2: float,
                 eps: float):
    """AdamW on a group's parameters, in place. step, lr and weight_decay are 0-D tensors, so the
    compiled version is not recompiled each time the schedule changes them."""
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        m.lerp_(g, 1 - beta1)
        v.lerp_(g.square(), 1 - beta2)
        denom = (v / (1 - beta2 ** step)).sqrt() + eps
        p.mul_(1 - lr * weight_decay)
        p.sub_(lr / (1 - beta1 ** step) * m / denom)


def muon_update(params, grads, momentum_buffer, second_moment, momentum, lr, weight_decay, beta2: float,
                ns_steps: int):
    """Muon on a group of same-shape matrices, in place: Nesterov momentum, Polar Express, NorMuon,
    cautious weight decay. momentum, lr and weight_decay are 0-D tensors (see adamw_update)."""
    g = torch.stack(grads).float()
    momentum_buffer.lerp_(g, 1 - momentum)
    update = normuon(polar_express(g.lerp_(momentum_buffer, momentum), ns_steps), second_moment, beta2)
    rows, cols = update.shape[-2:]
    lr = lr * max(1.0, rows / cols) ** 0.5
    weights = torch.stack(params).float()
    # cautious weight decay: decay only the coordinates where the update already shrinks the weight
    weights = weights - lr * weight_decay * weights * (update * weights > 0) - lr * update
    for p, w in zip(params, weights.unbind(0)):
        p.copy_(w)


class MuonAdamW(torch.optim.Optimizer):
    """Groups of kind "muon" hold same-shape matrices updated together; kind "adamw" groups are AdamW.

    With compile_backend (the fast path), each group's update is one compiled graph instead of
    hundreds of small kernels; it is compiled once per group shape, before the training clock."""

    def __init__(self, param_groups, compile_backend=None):
        super().__init__(param_groups, {})
        fuse = ((lambda fn: torch.compile(fn, backend=compile_backend, dynamic=False, fullgraph=True))
                if compile_backend else (lambda fn: fn))
        self._adamw, self._muon = fuse(adamw_update), fuse(muon_update)
        # the schedule's values, as 0-D CPU tensors (see adamw_update)
        self._step, self._lr, self._wd, self._momentum = (torch.zeros((), dtype=torch.float32) for _ in range(4))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._step_muon if group["kind"] == "muon" else self._step_adamw)(group, params)

    def _step_adamw(self, group, params):
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
        self._step.fill_(states[0]["step"])
        self._lr.fill_(group["lr"])
        self._wd.fill_(group["weight_decay"])
        beta1, beta2 = group["betas"]
        self._adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states], self._step, self._lr, self._wd, beta1, beta2, group["eps"])

    def _step_muon(self, group, params):
        state = self.state[params[0]]
        if not state:
            rows, cols = params[0].shape
            state["momentum"] = torch.zeros((len(params), rows, cols), dtype=torch.float32, device=params[0].device)
            state["second_moment"] = state["momentum"].new_zeros((len(params), rows, 1) if rows >= cols
                                                                 else (len(params), 1, cols))
        self._momentum.fill_(group["momentum"])
        self._lr.fill_(group["lr"])
        self._wd.fill_(group["weight_decay"])
        self._muon(params, [p.grad for p in params], state["momentum"], state["second_moment"], self._momentum,
                   self._lr, self._wd, group["beta2"], group["ns_steps"])


def build_optimizer(model, model_dim, compile_backend=None):
    scale = (model_dim / 768) ** -0.5  # AdamW lrs were tuned at width 768
    adam = dict(kind="adamw", betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0)
    groups = [
        dict(params=[model.lm_head.weight], lr=UNEMBEDDING_LR * scale, **adam),
        dict(params=[model.wte.weight], lr=EMBEDDING_LR * scale, **adam),
        dict(params=list(model.value_embeds.parameters()), lr=EMBEDDING_LR * scale, **adam),
        dict(params=[model.resid_lambdas], lr=SCALAR_LR * 0.01, **adam),
        dict(params=[model.x0_lambdas], lr=SCALAR_LR, **adam),
    ]
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    for shape in sorted({tuple(p.shape) for p in matrices}):
        groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape], lr=MATRIX_LR,
                           momentum=MUON_MOMENTUM_START, ns_steps=5, beta2=0.95, weight_decay=WEIGHT_DECAY))
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

watchdog = Watchdog(logger)
tokenizer = Tokenizer.from_directory()
manifest = load_manifest()
vocab_size = tokenizer.get_vocab_size()
model_dim = math.ceil(DEPTH * ASPECT_RATIO / HEAD_DIM) * HEAD_DIM
config = GPTConfig(sequence_len=max(SEQ_LEN, MAX_SEQ_LEN), vocab_size=vocab_size, n_layer=DEPTH,
                   n_head=model_dim // HEAD_DIM, n_embd=model_dim, window_pattern=WINDOW_PATTERN,
                   short_window=SHORT_WINDOW, softcap=LOGIT_SOFTCAP, ve_gate_channels=VE_GATE_CHANNELS,
                   attention=ATTENTION_BACKEND, dtype=COMPUTE_DTYPE)
model = GPT(config).to(device)
model.init_weights()
model.prepare_attention(sorted({SEQ_LEN, MAX_SEQ_LEN}))  # training and evaluation lengths
num_params = sum(p.numel() for p in model.parameters())
flops_per_token = model.num_flops_per_token(SEQ_LEN)
optimizer = build_optimizer(model, model_dim, COMPILE_BACKEND if FAST_PATH else None)
compiled = torch.compile(model, backend=COMPILE_BACKEND, dynamic=False) if FAST_PATH else model
layer_stats = LayerStats(model)

tokens_per_micro = DEVICE_BATCH_SIZE * SEQ_LEN
assert TOTAL_BATCH_SIZE % tokens_per_micro == 0, "TOTAL_BATCH_SIZE must be a multiple of DEVICE_BATCH_SIZE * SEQ_LEN"
grad_accum = TOTAL_BATCH_SIZE // tokens_per_micro
train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, SEQ_LEN, "train", device=device, seed=SEED)
x, y, epoch = next(train_loader)
peak = peak_flops(device)
loss_limit = LOSS_EXPLODE_FACTOR * math.log(vocab_size)

logger.set(seed=SEED, torch_version=torch.__version__, depth=DEPTH, num_params_M=num_params / 1e6)
print(f"device: {device_description(device)} | attention: {ATTENTION_BACKEND} | params: {num_params / 1e6:.1f}M "
      f"| dim {model_dim} x {DEPTH} layers | batch {TOTAL_BATCH_SIZE:,} tokens ({grad_accum} x {DEVICE_BATCH_SIZE} "
      f"x {SEQ_LEN}) | budget {TIME_BUDGET:.0f}s | data: {data_label(manifest)}", flush=True)


def warm_up_compilation():
    """Compile every graph the run uses before the training clock starts: a training micro-step and an
    optimizer step (both undone afterwards, so the run starts from the initial weights and state),
    then each batch shape of the evaluations."""
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
        warm_up_evaluation(compiled, tokenizer, EVAL_BATCH_SIZE)
    model.train()


if FAST_PATH:
    warm_up_compilation()
compiled_before_clock = compile_counters() if FAST_PATH else None

# ---------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------

startup_seconds = time.time() - t_start
logger.set(startup_seconds=startup_seconds)
interactive = sys.stdout.isatty()
step = 0
training_time = 0.0        # the clock TIME_BUDGET is measured against
loss_ema = 0.0
next_val = VAL_EVERY
last_print = 0.0

while True:
    synchronize(device)
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
    measure_layers = step % LAYER_STATS_EVERY == 0
    if measure_layers:
        layer_stats.before_step()
    optimizer.step()
    stats = layer_stats.after_step() if measure_layers else {}
    model.zero_grad(set_to_none=True)
    loss_f = train_loss.item()  # the step's one sync
    synchronize(device)
    dt = time.time() - t0

    if not math.isfinite(loss_f) or loss_f > loss_limit or not all(map(math.isfinite, stats.values())):
        message = f"loss {loss_f} at step {step} is not finite or exceeds {loss_limit:.1f} (diverged)"
        logger.finish("nan", error=message, training_seconds=training_time)
        print(f"\nFAIL: {message}", flush=True)
        sys.exit(1)

    if step >= CLOCK_WARMUP_STEPS:
        training_time += dt
    progress = min(training_time / TIME_BUDGET, 1.0)
    done = step >= CLOCK_WARMUP_STEPS and training_time >= TIME_BUDGET
    loss_ema = 0.9 * loss_ema + 0.1 * loss_f
    tokens_per_sec = TOTAL_BATCH_SIZE / dt
    mfu = 100 * flops_per_token * tokens_per_sec / peak if peak else 0.0
    record = {
        schema.STEP: step, schema.TIME_S: training_time, schema.TRAIN_LOSS: loss_f,
        schema.TRAIN_LOSS_SMOOTH: loss_ema / (1 - 0.9 ** (step + 1)), schema.LR_MULTIPLIER: lrm,
        schema.MUON_MOMENTUM: momentum, schema.WEIGHT_DECAY: wd, schema.PROGRESS: progress,
        schema.STEP_TIME_MS: dt * 1000, schema.TOKENS_PER_SEC: tokens_per_sec, schema.MFU_PERCENT: mfu,
        **stats,
    }
    if progress >= next_val or done:  # validation-curve point, off the training clock
        model.eval()
        with autocast:
            record[schema.VAL_BPB], record[schema.VAL_LOSS] = evaluate_val(compiled, tokenizer, EVAL_BATCH_SIZE,
                                                                           curve=True)
        model.train()
        next_val = (math.floor(progress / VAL_EVERY) + 1) * VAL_EVERY
    logger.log_step(record)

    if interactive or done or time.time() - last_print >= PRINT_EVERY_S or schema.VAL_BPB in record:
        last_print = time.time()
        val = f" | val_bpb: {record[schema.VAL_BPB]:.4f}" if schema.VAL_BPB in record else ""
        line = (f"step {step:05d} ({100 * progress:.1f}%) | loss: {record[schema.TRAIN_LOSS_SMOOTH]:.6f} "
                f"| lrm: {lrm:.2f} | dt: {dt * 1000:.0f}ms | tok/sec: {tokens_per_sec:,.0f} | mfu: {mfu:.1f}% "
                f"| epoch: {epoch} | remaining: {max(0.0, TIME_BUDGET - training_time):.0f}s{val}")
        if interactive:
            print(f"\r{line}    ", end="", flush=True)
        else:
            print(line, flush=True)

    if step == 0:  # after the first step's allocations: no GC pauses in the timed loop
        gc.collect()
        gc.freeze()
        gc.disable()
    step += 1
    if done:
        break

# ---------------------------------------------------------------------------
# Final evaluation and summary
# ---------------------------------------------------------------------------

print()
if FAST_PATH:  # graphs compiled after the clock started would have stalled it: 0 expected
    compile_after = compile_counters()
    compiled_stats = {"backend": COMPILE_BACKEND, **compile_after,
                      "graphs_in_loop": compile_after["graphs"] - compiled_before_clock["graphs"],
                      "recompiles_in_loop": compile_after["recompiles"] - compiled_before_clock["recompiles"]}
    logger.set(compile=compiled_stats)
    print(f"compile: {compile_after['graphs']} graphs, {compile_after['graph_breaks']} graph breaks, "
          f"{compile_after['recompiles']} recompiles; compiled during the timed loop: "
          f"{compiled_stats['graphs_in_loop']} graphs", flush=True)
model.eval()
timed_flops = flops_per_token * max(step - CLOCK_WARMUP_STEPS, 0) * TOTAL_BATCH_SIZE  # the steps on the clock
with autocast:  # the final val_bpb: evaluated by the harness itself, on the full evaluation slice
    summary = logger.evaluate_and_finish(
        compiled, EVAL_BATCH_SIZE, training_seconds=training_time, peak_vram_mb=peak_memory_mb(device),
        mfu_percent=100 * timed_flops / training_time / peak if peak and training_time > 0 else 0.0,
        total_tokens_M=step * TOTAL_BATCH_SIZE / 1e6, num_steps=step)
watchdog.stop()
print("---")
for key in schema.FINAL_BLOCK_KEYS:
    value = summary[key]
    print(f"{key + ':':<18}{value:.6f}" if key == "val_bpb" else
          f"{key + ':':<18}{value:.1f}" if isinstance(value, float) else f"{key + ':':<18}{value}")
print(f"{'data:':<18}{data_label(manifest)}")
