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
import shutil
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import prepare
from harness import contract, device, settings
import synthetic
from conftest import run_script
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
                      env_extra={"AUTORESEARCH_CPU_FAST_PATH": "1", "AUTORESEARCH_TIME_BUDGET": "4"})
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
    assert records[-1][contract.TRAIN_LOSS_SMOOTH] < records[0][contract.TRAIN_LOSS_SMOOTH] - 0.5  # it learns


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

