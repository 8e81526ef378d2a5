"""Device selection and the device facts a run records: a GPU machine whose CUDA is unusable stops
with the cause instead of training the CPU configuration; peak FLOPs by exact GPU name."""

import json
import os

import pytest
import torch

from harness import device
import synthetic
from conftest import run_script

OLD_DRIVER = "535.104.05"  # a CUDA 12.2 driver: too old for the CUDA 13 runtime of the locked torch


def fake_nvidia_smi(bin_dir, version=OLD_DRIVER):
    """An `nvidia-smi` that answers the driver-version query as the real one does."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho '{version}'\n")
    script.chmod(0o755)
    return bin_dir


def workdir(path):
    synthetic.copy_harness(path, ("train.py", "prepare.py"))
    return path


def test_train_py_stops_on_a_gpu_machine_whose_cuda_is_unusable(prepared, tmp_path):
    cwd = workdir(tmp_path)
    path = f"{fake_nvidia_smi(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}"
    proc = run_script(["train.py"], cwd=cwd, env_extra={"PATH": path, "AUTORESEARCH_TIME_BUDGET": "2"})
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    error = errors[0]
    assert f"an NVIDIA GPU is present (driver {OLD_DRIVER}) but torch {torch.__version__} cannot use it" in error
    if torch.version.cuda and int(torch.version.cuda.split(".")[0]) >= 13:
        assert f"its CUDA {torch.version.cuda} runtime needs driver >= 580" in error
    assert "AUTORESEARCH_ALLOW_CPU=1" in error and "README" in error
    assert "step 00000" not in proc.stdout  # stopped before training anything
    assert (cwd / "metrics.jsonl").read_text() == ""
    summary = json.loads((cwd / "run_summary.json").read_text())
    assert summary["status"] == "crash" and "NVIDIA GPU is present" in summary["error"]


def test_the_cpu_configuration_on_a_gpu_machine_is_an_explicit_choice(prepared, tmp_path):
    cwd = workdir(tmp_path)
    path = f"{fake_nvidia_smi(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}"
    proc = run_script(["train.py"], cwd=cwd, env_extra={"PATH": path, "AUTORESEARCH_TIME_BUDGET": "0.5",
                                                        "AUTORESEARCH_ALLOW_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA GPU found" in proc.stdout
    summary = json.loads((cwd / "run_summary.json").read_text())
    assert summary["status"] == "ok" and summary["device"] == "cpu"


@pytest.fixture
def no_nvidia(tmp_path, monkeypatch):
    """A machine that shows no NVIDIA GPU: no nvidia-smi on PATH, no kernel module file, no device file."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(device, "NVIDIA_DRIVER_VERSION_FILE", str(tmp_path / "no-such-version-file"))
    monkeypatch.setattr(device, "NVIDIA_DEVICE_FILES", (str(tmp_path / "no-such-device"),))
    return tmp_path


def test_driver_version_from_nvidia_smi(no_nvidia, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_nvidia_smi(no_nvidia / "bin", "580.65.06")))
    assert device.nvidia_driver_version() == "580.65.06"


def test_driver_version_from_the_kernel_module(no_nvidia, monkeypatch):
    version_file = no_nvidia / "version"
    version_file.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
                            "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    monkeypatch.setattr(device, "NVIDIA_DRIVER_VERSION_FILE", str(version_file))
    assert device.nvidia_driver_version() == "535.104.05"


def test_a_device_file_alone_shows_a_gpu(no_nvidia, monkeypatch):
    (no_nvidia / "nvidia0").write_text("")
    monkeypatch.setattr(device, "NVIDIA_DEVICE_FILES", (str(no_nvidia / "nvidia0"),))
    assert device.nvidia_driver_version() == ""


def test_no_sign_of_a_gpu(no_nvidia):
    assert device.nvidia_driver_version() is None
    assert device.autodetect_device().type in ("cpu", "mps")


def test_messages_name_the_cause_and_the_fix(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device.cuda_unusable_message("2.15.0+cu132", "13.2", "535.104.05", "found version 12020") == (
        "an NVIDIA GPU is present (driver 535.104.05) but torch 2.15.0+cu132 cannot use it: its CUDA 13.2 "
        "runtime needs driver >= 580 (torch: found version 12020). Fix: upgrade the NVIDIA driver, or install "
        "a torch built for an older CUDA (README, 'GPU driver'); or set AUTORESEARCH_ALLOW_CPU=1 to train the "
        "small CPU configuration on this machine anyway")
    assert device.cuda_unusable_message("2.15.0+cpu", None, "580.65.06", None) == (
        "an NVIDIA GPU is present (driver 580.65.06) but torch 2.15.0+cpu cannot use it: it is a CPU-only build. "
        "Fix: install a CUDA build of torch (README, 'GPU driver'); or set AUTORESEARCH_ALLOW_CPU=1 to train the "
        "small CPU configuration on this machine anyway")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "CUDA_VISIBLE_DEVICES='' may hide every GPU" in device.cuda_unusable_message(
        "2.15.0+cu132", "13.2", "580.65.06", "no CUDA-capable device is detected")


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.5), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.5), ("NVIDIA H800", 989.5), ("NVIDIA B200", 2250), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA L4", 121), ("NVIDIA L40", 181.05), ("NVIDIA L40S", 362.05),
    ("NVIDIA GeForce RTX 4090 D", None), ("Some Future GPU", None),
])
def test_peak_flops_by_exact_device_name(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = device.peak_flops(torch.device("cuda"))
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))
    assert device.peak_flops(torch.device("cpu")) is None
