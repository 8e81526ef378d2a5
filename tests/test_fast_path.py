"""The CUDA code path of train.py, checked without a GPU.

- train.py's fast path (bf16 autocast, torch.compile of the model and of the optimizer step,
  flex_attention with the real block masks) run end to end on CPU, compiled with aot_eager: status ok,
  no graph break, nothing compiled once the training clock runs.
- The full-size model traced under CUDA's autocast rules with FakeTensorMode tensors on device "cuda":
  q, k and v reach attention in bf16, the logits and the loss are fp32.
- The compiled optimizer step computes what the eager one does and is not recompiled when the
  schedule changes its hyperparameters.
"""

import json
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import synthetic
from conftest import ROOT, run_script
from harness import contract, device, settings
from train_defs import load_train_definitions

# flex_attention refuses a backward on CPU with a front-end device check only (its math
# implementation has a backward); the fast-path run lifts that check, nothing else.
FAST_PATH_RUNNER = """\
import runpy, sys
import torch.nn.attention.flex_attention as flex
flex._validate_device = lambda query, key, value: None
sys.argv = ["train.py"]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def fast_run(prepared, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("fast")
    synthetic.copy_harness(cwd, ("train.py", "prepare.py"))
    (cwd / "run_fast.py").write_text(FAST_PATH_RUNNER)
    proc = run_script(["run_fast.py"], cwd=cwd, timeout=900,
                      env_extra={"AUTORESEARCH_CPU_FAST_PATH": "1",
                                 "AUTORESEARCH_TIME_BUDGET": "8"})
    return cwd, proc


def test_fast_path_trains_on_cpu_with_no_graph_break_and_no_compile_on_the_clock(fast_run):
    cwd, proc = fast_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "the CUDA code path" in proc.stdout
    summary = json.loads((cwd / "run_summary.json").read_text())
    assert contract.summary_problems(summary) == []
    assert summary["status"] == "ok" and math.isfinite(summary["val_bpb"])
    config = summary["config"]
    assert config["FAST_PATH"] is True and config["ATTENTION_BACKEND"] == "flex"
    assert config["COMPUTE_DTYPE"] == "torch.bfloat16" and config["COMPILE_BACKEND"] == "aot_eager"
    compiled = summary["compile"]
    assert compiled["backend"] == "aot_eager"
    assert compiled["graph_breaks"] == 0
    assert compiled["graphs_in_loop"] == 0 and compiled["recompiles_in_loop"] == 0, compiled
    assert compiled["graphs"] >= 4  # training step, evaluation, the AdamW and the Muon updates
    records = [json.loads(line) for line in (cwd / "metrics.jsonl").read_text().splitlines()]
    assert all(contract.step_record_problems(r) == [] for r in records)
    assert sum(contract.VAL_BPB in r for r in records) >= 2
    # it learns: the raw loss drops by 0.5 within 4 steps (2 on the clock), the smoothed one in 6;
    # how many steps fit in the budget depends on how loaded the CPU is (up to 3 s a step, shared)
    assert len(records) >= 4
    assert records[-1][contract.TRAIN_LOSS] < records[0][contract.TRAIN_LOSS] - 0.5


def cuda_autocast():
    """CUDA's autocast, entered without a GPU: its constructor asks the driver, the dispatch rules do not."""
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        return torch.autocast("cuda", dtype=torch.bfloat16)


class RecordSDPA(TorchFunctionMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls.append(("sdpa", *(t.dtype for t in args[:3])))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU-only torch build has no CUDA kernels to dispatch to, "
                    "even for fake tensors; the locked torch is a CUDA build")
def test_attention_runs_in_bf16_under_cuda_autocast():
    from torch._subclasses.fake_tensor import FakeTensorMode
    calls = []

    def record_flex(q, k, v, block_mask=None):
        calls.append(("flex", q.dtype, k.dtype, v.dtype))
        assert type(block_mask).__name__ == "BlockMask"
        return torch.empty_like(q)  # the kernel itself needs a GPU

    defs = load_train_definitions(overrides={"flex_attention": record_flex})
    assert defs["FAST_PATH"] and defs["COMPUTE_DTYPE"] == torch.bfloat16  # train.py's defaults: the CUDA run
    dim = math.ceil(defs["DEPTH"] * defs["ASPECT_RATIO"] / defs["HEAD_DIM"]) * defs["HEAD_DIM"]
    config = defs["GPTConfig"](
        sequence_len=settings.MAX_SEQ_LEN, vocab_size=settings.VOCAB_SIZE, n_layer=defs["DEPTH"],
        n_head=dim // defs["HEAD_DIM"], n_embd=dim, window_pattern=defs["WINDOW_PATTERN"],
        short_window=defs["SHORT_WINDOW"], softcap=defs["LOGIT_SOFTCAP"],
        ve_gate_channels=defs["VE_GATE_CHANNELS"], attention="flex", dtype=defs["COMPUTE_DTYPE"])
    with FakeTensorMode(), torch.device("cuda"):
        model = defs["GPT"](config)
        model.init_weights()
        model.prepare_attention([settings.MAX_SEQ_LEN])
        idx = torch.zeros(2, settings.MAX_SEQ_LEN, dtype=torch.int64)
        with cuda_autocast(), RecordSDPA(calls):
            logits = model(idx)
            loss = model(idx, idx)
    assert model.cos.dtype == model.sin.dtype == torch.bfloat16
    assert logits.device.type == "cuda"
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32  # softcap and cross-entropy in fp32
    assert len(calls) == 2 * defs["DEPTH"]
    windows = model.windows
    expected = [("flex" if w < settings.MAX_SEQ_LEN else "sdpa", torch.bfloat16, torch.bfloat16, torch.bfloat16)
                for w in windows]
    assert calls == expected * 2
    assert {c[0] for c in calls} == {"flex", "sdpa"}  # both the sliding and the full layers were seen


def tiny_model(defs, seed=0):
    torch.manual_seed(seed)
    config = defs["GPTConfig"](sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, window_pattern="SL",
                               short_window=8, softcap=15.0, ve_gate_channels=8)
    model = defs["GPT"](config)
    model.init_weights()
    model.prepare_attention([32])
    return model


def test_compiled_optimizer_step_matches_eager_and_is_not_recompiled_by_the_schedule(train_defs):
    eager_model, compiled_model = tiny_model(train_defs), tiny_model(train_defs)
    eager = train_defs["build_optimizer"](eager_model, 32)
    compiled = train_defs["build_optimizer"](compiled_model, 32, "aot_eager")
    torch.manual_seed(1)
    data = torch.randint(0, 64, (4, 33))
    recompiles = []
    for step, lrm in enumerate([1.0, 0.7, 0.3, 0.1]):
        for model, optimizer in ((eager_model, eager), (compiled_model, compiled)):
            model(data[:, :-1], data[:, 1:]).backward()
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if group["kind"] == "muon":
                    group["momentum"], group["weight_decay"] = 0.85 + 0.03 * step, 0.2 * lrm
            optimizer.step()
            model.zero_grad(set_to_none=True)
        recompiles.append(device.compile_counters()["recompiles"])
        for (name, a), b in zip(eager_model.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"{name} after step {step}")
    assert recompiles[1:] == [recompiles[0]] * 3  # new lr, momentum, weight decay: same graphs
    assert compiled_model.blocks[0].attn.c_q.weight.sub(tiny_model(train_defs).blocks[0].attn.c_q.weight).abs().max() > 0


# ---------------------------------------------------------------------------
# The residual stream's dtype under CUDA autocast
# ---------------------------------------------------------------------------

CUDA_BUILD = pytest.mark.skipif(
    torch.version.cuda is None, reason="a CPU-only torch build has no CUDA kernels to dispatch to, "
    "even for fake tensors; the locked torch is a CUDA build")


def torch_release():
    """This torch's (major, minor), e.g. (2, 15) for "2.15.0+cu132"."""
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def full_size_config(defs):
    """train.py's default model (its CUDA configuration) at the harness's length and vocabulary."""
    dim = math.ceil(defs["DEPTH"] * defs["ASPECT_RATIO"] / defs["HEAD_DIM"]) * defs["HEAD_DIM"]
    return defs["GPTConfig"](
        sequence_len=settings.MAX_SEQ_LEN, vocab_size=settings.VOCAB_SIZE, n_layer=defs["DEPTH"],
        n_head=dim // defs["HEAD_DIM"], n_embd=dim, window_pattern=defs["WINDOW_PATTERN"],
        short_window=defs["SHORT_WINDOW"], softcap=defs["LOGIT_SOFTCAP"],
        ve_gate_channels=defs["VE_GATE_CHANNELS"], attention="flex", dtype=defs["COMPUTE_DTYPE"])


def record_residual_stream(model, defs, stream):
    """Append (place, dtype) to `stream` for x0 (the first norm() of a forward, of the embedding)
    and for every Block's input and output. norm() is wrapped, not replaced: the real one runs."""
    real_norm = defs["norm"]

    def recording_norm(x):
        out = real_norm(x)
        if not stream:
            stream.append(("x0", out.dtype))
        return out

    defs["norm"] = recording_norm  # train.py's functions look `norm` up in this namespace
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(
            lambda module, args, i=i: stream.append((f"block {i} input", args[0].dtype)))
        block.register_forward_hook(
            lambda module, args, out, i=i: stream.append((f"block {i} output", out.dtype)))


@CUDA_BUILD
def test_the_residual_stream_stays_bf16_under_cuda_autocast():
    """The full-size default model traced under CUDA's autocast rules (fake tensors on "cuda"): x0
    and every Block's input and output are bf16, whatever dtype autocast gives rms_norm (fp32
    since torch 2.12), so the residual stream's dtype does not depend on the torch release."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    defs = load_train_definitions(
        overrides={"flex_attention": lambda q, k, v, block_mask=None: torch.empty_like(q)})
    assert defs["FAST_PATH"] and defs["COMPUTE_DTYPE"] == torch.bfloat16
    stream = []
    with FakeTensorMode(), torch.device("cuda"):
        model = defs["GPT"](full_size_config(defs))
        model.init_weights()
        model.prepare_attention([settings.MAX_SEQ_LEN])
        record_residual_stream(model, defs, stream)
        idx = torch.zeros(2, settings.MAX_SEQ_LEN, dtype=torch.int64)
        with cuda_autocast():
            logits = model(idx)
    assert logits.device.type == "cuda"
    places = ["x0"] + [f"block {i} {end}" for i in range(defs["DEPTH"])
                       for end in ("input", "output")]
    assert [place for place, _ in stream] == places
    assert stream == [(place, torch.bfloat16) for place in places]


@CUDA_BUILD
def test_cuda_autocast_runs_rms_norm_in_fp32_on_this_torch():
    """The premise of norm()'s cast back to its input's dtype: on this torch, CUDA autocast turns
    F.rms_norm of a bf16 tensor into an fp32 result (from torch 2.12 on; bf16 before)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    if torch_release() < (2, 12):
        pytest.skip(f"torch {torch.__version__} is older than 2.12: its CUDA autocast keeps "
                    f"rms_norm in its input's dtype, the premise holds from 2.12 on")
    with FakeTensorMode(), torch.device("cuda"):
        x = torch.randn(2, 16, 64, dtype=torch.bfloat16)
        with cuda_autocast():
            y = F.rms_norm(x, (64,))
    assert x.dtype == torch.bfloat16 and y.device.type == "cuda"
    assert y.dtype == torch.float32


# ---------------------------------------------------------------------------
# The compiled optimizer: many group shapes, parameters without a gradient
# ---------------------------------------------------------------------------

def shaped_groups(n_adamw, n_muon, adamw_size=1, muon_size=2, seed=0):
    """MuonAdamW param groups of distinct shapes: n_adamw AdamW groups of `adamw_size` (3 + i, 4)
    tensors and n_muon Muon groups of `muon_size` (4 + i, 6) matrices; the same values for the
    same seed."""
    gen = torch.Generator().manual_seed(seed)
    adam = dict(kind="adamw", lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    muon = dict(kind="muon", lr=0.02, momentum=0.9, ns_steps=5, beta2=0.95, weight_decay=0.1)
    groups = [dict(params=[torch.nn.Parameter(torch.randn(3 + i, 4, generator=gen))
                           for _ in range(adamw_size)], **adam) for i in range(n_adamw)]
    groups += [dict(params=[torch.nn.Parameter(torch.randn(4 + i, 6, generator=gen) * 0.1)
                            for _ in range(muon_size)], **muon) for i in range(n_muon)]
    return groups


def set_grads(groups, step, missing=()):
    """Give every parameter a gradient drawn from `step`'s seed (the same for any copy of the
    groups), except the (group index, parameter index) pairs in `missing`: grad None."""
    gen = torch.Generator().manual_seed(1000 + step)
    for g, group in enumerate(groups):
        for i, p in enumerate(group["params"]):
            grad = torch.randn(p.shape, generator=gen)
            p.grad = None if (g, i) in missing else grad


def all_params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


@pytest.fixture
def fresh_dynamo():
    """Dynamo as a new process (train.py) has it: no graph cached yet; the recompile limit that
    MuonAdamW raises is put back after the test."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):
        yield


def test_the_compiled_optimizer_takes_more_group_shapes_than_the_recompile_limit(
        train_defs, fresh_dynamo):
    """One compiled graph per group shape, fullgraph: 10 AdamW and 10 Muon groups of distinct
    shapes (more than torch's default recompile limit of 8 per function) step twice without
    FailOnRecompileLimitHit and end where the eager optimizer ends."""
    MuonAdamW = train_defs["MuonAdamW"]
    eager = MuonAdamW(shaped_groups(10, 10))
    compiled = MuonAdamW(shaped_groups(10, 10), "aot_eager")
    initial = [p.detach().clone() for p in all_params(compiled)]
    graphs = [device.compile_counters()["graphs"]]
    for step in range(2):
        for optimizer in (eager, compiled):
            set_grads(optimizer.param_groups, step)
            optimizer.step()
        graphs.append(device.compile_counters()["graphs"])
    assert graphs[1] - graphs[0] >= 20  # a graph per group shape, in the first step
    assert graphs[2] == graphs[1]  # and none in the second
    for i, (a, b) in enumerate(zip(all_params(eager), all_params(compiled))):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"parameter {i}")
    assert all(not torch.equal(p, p0) for p, p0 in zip(all_params(compiled), initial))


def optimizer_state(optimizer, p, group):
    """Copies of what MuonAdamW keeps for parameter `p` of `group`: AdamW's exp_avg and exp_avg_sq,
    or Muon's momentum and second-moment rows of that matrix (its row in the group's stacks)."""
    if group["kind"] == "adamw":
        state = optimizer.state[p]
        return [state["exp_avg"].clone(), state["exp_avg_sq"].clone()]
    i = next(i for i, q in enumerate(group["params"]) if q is p)
    state = optimizer.state[group["params"][0]]
    return [state["momentum"][i].clone(), state["second_moment"][i].clone()]


def test_a_parameter_without_a_gradient_neither_recompiles_nor_moves(train_defs, fresh_dynamo):
    """After a warm step with every gradient, a step where one matrix of a Muon group and one AdamW
    parameter have no gradient compiles nothing (same graphs, no recompile); those two and their
    optimizer state stay bit for bit, every other parameter moves as the eager optimizer moves it
    given the same gradients; a third step with every gradient back compiles nothing either."""
    MuonAdamW = train_defs["MuonAdamW"]
    eager = MuonAdamW(shaped_groups(2, 1, adamw_size=2, muon_size=3))
    compiled = MuonAdamW(shaped_groups(2, 1, adamw_size=2, muon_size=3), "aot_eager")
    missing = {(1, 1), (2, 1)}  # the second tensor of an AdamW group, the second Muon matrix
    for optimizer in (eager, compiled):
        set_grads(optimizer.param_groups, 0)
        optimizer.step()
    groups = compiled.param_groups
    idle = [(groups[g]["params"][i], groups[g]) for g, i in sorted(missing)]
    before = [(p.detach().clone(), optimizer_state(compiled, p, group)) for p, group in idle]
    params_before = [p.detach().clone() for p in all_params(compiled)]
    warm = device.compile_counters()
    for step in (1, 2):
        for optimizer in (eager, compiled):
            set_grads(optimizer.param_groups, step, missing if step == 1 else ())
            optimizer.step()
        counters = device.compile_counters()
        assert (counters["graphs"], counters["recompiles"]) == \
            (warm["graphs"], warm["recompiles"]), counters["recompile_reasons"]
        if step == 1:
            for (p, group), (p0, state0) in zip(idle, before):
                assert torch.equal(p, p0)
                for now, then in zip(optimizer_state(compiled, p, group), state0):
                    assert torch.equal(now, then)
            moved = [not torch.equal(p, p0) for p, p0 in zip(all_params(compiled), params_before)]
            assert moved == [all(p is not q for q, _ in idle) for p in all_params(compiled)]
        for i, (a, b) in enumerate(zip(all_params(eager), all_params(compiled))):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6,
                                       msg=f"parameter {i} after step {step}")


# ---------------------------------------------------------------------------
# A crash before the clock keeps torch.compile's statistics
# ---------------------------------------------------------------------------

WARM_UP_STEP = "    warm_loss.backward()\n    optimizer.step()\n"
WARM_UP_CRASH = 'raise RuntimeError("planted: the warm-up compilation crashed")'


def test_a_crash_in_the_warm_up_compilation_keeps_the_compile_statistics(prepared, tmp_path):
    """A real fast-path run on CPU whose train.py raises inside warm_up_compilation(), after the
    training step and the optimizer step compiled: it crashes with a `crash` summary that still
    holds the `compile` object (graphs compiled so far) and no in-loop fields (the clock never
    started)."""
    source = (ROOT / "train.py").read_text()
    assert source.count(WARM_UP_STEP) == 1  # the place to plant the crash is still there
    synthetic.copy_harness(tmp_path, ("train.py", "prepare.py"))
    (tmp_path / "train.py").write_text(
        source.replace(WARM_UP_STEP, f"{WARM_UP_STEP}    {WARM_UP_CRASH}\n"))
    (tmp_path / "run_fast.py").write_text(FAST_PATH_RUNNER)
    proc = run_script(["run_fast.py"], cwd=tmp_path, timeout=900,
                      env_extra={"AUTORESEARCH_CPU_FAST_PATH": "1",
                                 "AUTORESEARCH_TIME_BUDGET": "2"})
    assert proc.returncode != 0
    assert "planted: the warm-up compilation crashed" in proc.stderr, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert contract.summary_problems(summary) == []
    assert summary["status"] == "crash" and "planted" in summary["error"]
    assert summary["num_steps"] == 0 and not (tmp_path / "metrics.jsonl").read_text()
    compiled = summary["compile"]
    assert isinstance(compiled, dict), summary
    assert compiled["backend"] == "aot_eager"
    assert compiled["graphs"] >= 3  # the training step, the AdamW and the Muon updates
    assert compiled["graph_breaks"] == 0
    assert "graphs_in_loop" not in compiled and "recompiles_in_loop" not in compiled
