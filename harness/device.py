"""
The device a run trains on: CUDA when usable (never a silent CPU run on a GPU machine whose CUDA
is broken), its peak FLOPs, memory and identity, and torch.compile's counters.
"""

import os
import re
import subprocess
from pathlib import Path

from harness import settings
from harness.contract import HarnessError

# Dense bf16 tensor-core peak FLOP/s (NVIDIA datasheets: the figure without sparsity, which is half
# the headline one) by the exact name CUDA reports. Exact, because names overlap ("NVIDIA L4" and
# "NVIDIA L40", the H100's SXM, PCIe and NVL parts); MFU is 0 on a GPU not listed here.
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989.5e12,   # H100 SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835.5e12,
    "NVIDIA H200": 989.5e12,             # H200 SXM
    "NVIDIA H200 NVL": 835.5e12,
    "NVIDIA H800": 989.5e12,             # H800 SXM5
    "NVIDIA H800 PCIe": 756e12,
    "NVIDIA H20": 148e12,
    "NVIDIA GH200 480GB": 989.5e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A800-SXM4-80GB": 312e12,
    "NVIDIA A800 80GB PCIe": 312e12,
    "NVIDIA L40S": 362.05e12,
    "NVIDIA L40": 181.05e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
    "NVIDIA GeForce RTX 4090": 165.2e12,  # with fp32 accumulation, as torch's bf16 matmuls use
}

# Linux driver a CUDA major version needs (CUDA minor-version compatibility: any 13.x runs on
# >= 580).
CUDA_MIN_DRIVER = {13: 580, 12: 525, 11: 450}
NVIDIA_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0")
NVIDIA_DRIVER_VERSION_FILE = "/proc/driver/nvidia/version"


def nvidia_driver_version():
    """The NVIDIA driver's version ("580.65.06") where nvidia-smi answers or the kernel module says
    it; "" where only an NVIDIA device file shows a GPU; None where nothing shows an NVIDIA GPU."""
    import shutil
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            versions = out.stdout.split()
            if out.returncode == 0 and versions:
                return versions[0]
        except subprocess.TimeoutExpired:
            pass  # a hung nvidia-smi: fall back to the kernel module's file and the device files
    try:
        found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)",
                          Path(NVIDIA_DRIVER_VERSION_FILE).read_text())
        if found:
            return found.group(1)
    except OSError:
        pass  # no NVIDIA kernel module loaded
    return "" if any(os.path.exists(f) for f in NVIDIA_DEVICE_FILES) else None


def cuda_unusable_message(torch_version: str, torch_cuda, driver: str, init_error) -> str:
    """Why CUDA is unusable on a machine with an NVIDIA GPU, and what to do, in one line."""
    head = (f"an NVIDIA GPU is present (driver {driver or 'not answering'}) but torch "
            f"{torch_version} cannot use it")
    fix = ("upgrade the NVIDIA driver, or install a torch built for an older CUDA "
           "(README, 'GPU driver')")
    if not torch_cuda:
        cause, fix = ("it is a CPU-only build",
                      "install a CUDA build of torch (README, 'GPU driver')")
    else:
        major = int(str(torch_cuda).split(".")[0])
        needed = CUDA_MIN_DRIVER.get(major)
        driver_major = int(driver.split(".")[0]) if driver[:1].isdigit() else None
        if needed and driver_major is not None and driver_major < needed:
            cause = f"its CUDA {torch_cuda} runtime needs driver >= {needed}"
        elif os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
            cause = (f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} "
                     f"may hide every GPU")
            fix = "unset CUDA_VISIBLE_DEVICES or name a GPU in it"
        else:
            cause = f"CUDA {torch_cuda} could not start"
            fix = "check `nvidia-smi` and the driver installation"
    said = f" (torch: {init_error})" if init_error else ""
    return (f"{head}: {cause}{said}. Fix: {fix}; or set {settings.ALLOW_CPU_ENV}=1 to train the "
            f"small CPU configuration on this machine anyway")


def _cuda_init_error():
    """torch's own first line on why CUDA does not start, or None."""
    import torch
    try:
        torch.cuda.init()
    except (RuntimeError, AssertionError) as e:
        # AssertionError: "Torch not compiled with CUDA enabled"
        lines = str(e).strip().splitlines()
        return lines[0] if lines else type(e).__name__
    return None


def autodetect_device():
    """cuda when usable; on a machine with an NVIDIA GPU that CUDA cannot use, a HarnessError naming
    the cause (never a silent CPU run), unless AUTORESEARCH_ALLOW_CPU=1; else mps or cpu."""
    import torch
    if torch.cuda.is_available():
        return torch.device("cuda")
    driver = nvidia_driver_version()
    if driver is not None and not settings.ALLOW_CPU:
        raise HarnessError(cuda_unusable_message(torch.__version__, torch.version.cuda, driver,
                                                 _cuda_init_error()))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def synchronize(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_flops(device):
    """Peak bf16 FLOP/s of `device`, or None where unknown (CPU, MPS, unlisted GPUs)."""
    import torch
    if device.type != "cuda":
        return None
    return PEAK_BF16_FLOPS.get(torch.cuda.get_device_name(device))


def peak_memory_mb(device) -> float:
    import torch
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def hardware_identity() -> str:
    """The device this process trains on, as the harness sees it: what every summary records as its
    `device` (a pool key), whatever train.py says."""
    try:
        import torch
    except ImportError as e:
        return f"unknown (torch does not import: {e})"
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def device_description(device) -> str:
    import torch
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


# guard failures quoted in a summary: enough to see the cause, short to read
MAX_RECOMPILE_REASONS = 5


def compile_counters() -> dict:
    """torch.compile's running totals in this process: graphs compiled, graph breaks, recompilations
    (a graph compiled again because a guard failed) and the first reasons for them. Take it before
    and after the training loop: a graph compiled inside the timed loop is a stall on the training
    clock."""
    from torch._dynamo.utils import counters, guard_failures
    reasons = [r for failures in guard_failures.values() for r in failures]
    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "recompiles": len(reasons),
            "recompile_reasons": [r.splitlines()[0] for r in reasons[:MAX_RECOMPILE_REASONS]]}

