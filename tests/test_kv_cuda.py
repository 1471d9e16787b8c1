"""The CUDA part of the build (csrc/cuda, module cai_fast._cuda): it compiles for sm_80 and sm_90
(here with nvcc, no GPU needed), CMake builds it only where asked and a toolkit is found, and on
a GPU its kernels equal their torch twin (KVPool with kernels='torch') bit for bit."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cai_fast.engine.kv import HAVE_CUDA_KERNELS, KVPool, KVShape

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or next((str(p) for p in sorted(Path("/usr/local").glob("cuda*/bin/nvcc"))), None)


def _run(args: list[str], cwd: Path = ROOT) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.skipif(NVCC is None, reason="no CUDA toolkit (nvcc) here")
def test_cuda_kernels_compile_for_sm80_and_sm90(tmp_path):
    _run([NVCC, "-std=c++17", "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
          "-c", str(ROOT / "csrc/cuda/kv_cache.cu"), "-o", str(tmp_path / "kv_cache.o")])


@pytest.mark.skipif(shutil.which("cmake") is None or importlib.util.find_spec("pybind11") is None,
                    reason="cmake or pybind11 is not installed")
def test_without_cuda_the_build_is_the_cpu_build(tmp_path):
    import pybind11

    out = _run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-DCAI_FAST_CUDA=OFF",
                f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"])
    assert "CPU build only" in out
    targets = tmp_path / "CMakeFiles"
    assert (targets / "_core.dir").is_dir() and not (targets / "_cuda.dir").exists()


@pytest.mark.skipif(not (HAVE_CUDA_KERNELS and torch.cuda.is_available()), reason="needs a GPU and cai_fast._cuda")
@pytest.mark.parametrize("dtype,kv_heads,head_dim", [(torch.bfloat16, 3, 64), (torch.float32, 3, 7)])
def test_cuda_store_and_clear_equal_the_torch_twin(dtype, kv_heads, head_dim):
    shape, gen = KVShape(2, kv_heads, head_dim, dtype), torch.Generator(device="cuda").manual_seed(0)
    pools = [KVPool(shape, 9, 5, "cuda", kernels) for kernels in ("auto", "torch")]
    assert pools[0].cuda and not pools[1].cuda
    for t in (*pools[0].k, *pools[0].v):
        t.copy_(torch.randn(t.shape, generator=gen, device="cuda"))
    for a, b in zip((*pools[1].k, *pools[1].v), (*pools[0].k, *pools[0].v)):
        a.copy_(b)
    slots = torch.randperm(45, generator=gen, device="cuda")[:13]
    k, v = (torch.randn(13, kv_heads, head_dim, generator=gen, device="cuda").to(dtype) for _ in range(2))
    for pool in pools:
        pool.write(1, slots, k, v)
        pool.clear(torch.tensor([7, 2], device="cuda"))
    torch.cuda.synchronize()
    for a, b in zip((*pools[0].k, *pools[0].v), (*pools[1].k, *pools[1].v)):
        assert torch.equal(a, b)
