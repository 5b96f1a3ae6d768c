"""The folded norms on the TMA GEMVs (mlcc.backends.cuda.norm_fold with gemv_tma, knob
tma_fold, on at O2): nvcc sm_90 compiles the 7B decode's producers (o_proj with one K slice,
down with four) and consumers (qkv, the GLU) without spills. Their values are checked on host
threads (test_cuda_gemv_tma_emulated) and on the GPU
(tests/gpu/test_cuda_parity.py::test_norms_folded_into_tma_gemvs_equal_the_norm_kernels)."""

from __future__ import annotations

import shutil

import pytest
from test_cuda_gemv_persistent import ptxas
from test_cuda_gemv_tc_wiring import lowered_7b

from mlcc.backends.cuda import norm_fold
from mlcc.backends.cuda.codegen import library_parts


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_the_folded_7b_kernels_compile_without_spills(tmp_path):
    built, _, _, _ = library_parts(lowered_7b(1), {"params": []}, fuse_glu=True, tma_gemv=True,
                                   lean_attention=True, tma_fold=True)
    ops = (norm_fold.PRODUCER, *norm_fold.CONSUMERS.values())
    kernels = [k for k in built if k.name.split("_", 1)[1] in ops]
    assert sorted(k.name.split("_", 1)[1] for k in kernels) == sorted(
        [norm_fold.PRODUCER] * 2 + list(norm_fold.CONSUMERS.values()))
    done = ptxas(kernels, tmp_path, "cubin")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count(" 0 bytes spill stores") == len(kernels), done.stderr
