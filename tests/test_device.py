"""Device choice, matmul precision under torch's new API and the environment overrides,
device identity for checkpoints, and what counts as out of memory."""

import warnings

import pytest
import torch

from kernelscale.device import (
    check_precision_environment,
    describe_device_change,
    device_info,
    is_out_of_memory,
    matmul_precision,
    resolve_device,
)
from kernelscale.errors import ConfigError

NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


@pytest.fixture
def restore_precision():
    m = torch.backends.cuda.matmul
    old = m.fp32_precision if NEW_API else None
    yield
    if NEW_API:
        m.fp32_precision = old


@pytest.mark.skipif(not NEW_API, reason="torch without the fp32_precision API")
@pytest.mark.parametrize("outer", ["tf32", "ieee", "none"])
def test_precision_uses_only_the_new_api_and_restores_it(outer, restore_precision):
    m = torch.backends.cuda.matmul
    m.fp32_precision = outer  # as another library in the process might have set it
    with matmul_precision("fp32"):
        assert m.fp32_precision == "ieee"
        with matmul_precision("tf32"):
            assert m.fp32_precision == "tf32"
        assert m.fp32_precision == "ieee"
    assert m.fp32_precision == outer


@pytest.mark.skipif(not NEW_API, reason="torch without the fp32_precision API")
def test_precision_after_new_api_tf32_does_not_touch_the_legacy_flag(restore_precision):
    """Once the new API set TF32, reading the legacy ``allow_tf32`` raises (torch refuses
    a mix); entering the context must not."""
    m = torch.backends.cuda.matmul
    m.fp32_precision = "tf32"
    with pytest.raises(RuntimeError):
        _ = m.allow_tf32  # what the former implementation did on entry
    with matmul_precision("fp32"):
        assert m.fp32_precision == "ieee"
    assert m.fp32_precision == "tf32"


def test_tf32_override_variable_refuses_fp32():
    env = {"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"}
    with pytest.raises(ConfigError, match="TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1.*--precision tf32"):
        check_precision_environment("fp32", env)
    check_precision_environment("tf32", env)  # what it forces is what was asked
    check_precision_environment("fp32", {"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "0"})


def test_tf32_override_in_the_environment_reaches_the_kernel(small_store, tmp_path,
                                                             monkeypatch):
    from kernelscale.kernel import KernelConfig, compute_kernel

    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")
    with pytest.raises(ConfigError, match="TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"):
        compute_kernel(KernelConfig(store=small_store[0], out=tmp_path / "k",
                                    show_progress=False))


def test_driver_tf32_disabled_warns_in_tf32_mode():
    with pytest.warns(UserWarning, match="NVIDIA_TF32_OVERRIDE=0"):
        check_precision_environment("tf32", {"NVIDIA_TF32_OVERRIDE": "0"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_precision_environment("fp32", {"NVIDIA_TF32_OVERRIDE": "0"})


def test_out_of_memory_includes_cublas_allocation_failures():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory."))
    assert is_out_of_memory(RuntimeError(
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert not is_out_of_memory(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED"))
    assert not is_out_of_memory(ValueError("CUBLAS_STATUS_ALLOC_FAILED"))


def test_cuda_device_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda:1")
    assert resolve_device("auto").type == "cpu"


def test_cuda_index_past_the_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)  # always carries its index
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match="2 CUDA device"):
        resolve_device("cuda:2")


def test_device_info_and_changes():
    info = device_info(torch.device("cpu"))
    assert info["type"] == "cpu" and info["torch"] == torch.__version__
    assert info["threads"] == torch.get_num_threads()
    assert describe_device_change(info, dict(info)) == ""
    other = dict(info, name="NVIDIA H100 80GB HBM3", torch="2.11.0")
    change = describe_device_change(other, info)
    assert "name NVIDIA H100 80GB HBM3 -> " in change and "torch 2.11.0 -> " in change
    # the CPU's GEMMs are numpy's BLAS: a checkpoint of torch's (no BLAS recorded) or of
    # another BLAS thread count is another device
    assert info["blas"].startswith("scipy-openblas ") and info["blas_threads"] >= 1
    old = {k: v for k, v in info.items() if not k.startswith("blas")}
    assert "blas None -> scipy-openblas" in describe_device_change(old, info)


def test_the_blas_thread_count_is_the_librarys_own():
    import os
    import subprocess
    import sys

    code = ("import torch\nfrom kernelscale.device import device_info\n"
            "print(device_info(torch.device('cpu'))['blas_threads'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert out.stdout.split() == ["1"]


def test_device_name_loads_torch_only_where_a_gpu_may_be(monkeypatch, tmp_path):
    import kernelscale.device as d

    calls = []
    monkeypatch.setattr(d, "resolve_device", lambda n: calls.append(n) or torch.device("cpu"))
    monkeypatch.setattr(d.sys, "platform", "linux")
    monkeypatch.setattr(d, "GPU_NODES", (str(tmp_path / "nvidia*"),))
    assert d.device_name("auto") == "cpu" and d.device_name("cpu") == "cpu" and calls == []
    (tmp_path / "nvidia0").touch()  # a GPU driver's node: torch decides
    assert d.device_name("auto") == "cpu" and calls == ["auto"]
    assert d.device_name("cuda:1") == "cpu" and calls == ["auto", "cuda:1"]
    (tmp_path / "nvidia0").unlink()
    monkeypatch.setattr(d.sys, "platform", "darwin")  # no device nodes to look at
    d.device_name("auto")
    assert calls[-1] == "auto" and len(calls) == 3
