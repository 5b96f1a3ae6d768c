"""Blocks per SM a kernel asks for (CudaKernel.min_blocks) reach its launch bound in the build.

The one-shot decode GEMV with the integer dot at K = 11008 takes 164 registers a thread with
8 warps and two features a warp: one block an SM, two waves of blocks. Its database record asks
for two blocks an SM ("min_blocks"); TVM's wrapper then reads `__launch_bounds__(256, 2)` and
ptxas keeps the thread within 128 registers (benchmarks/results/2026-11-29-h200-h: 11.3 ->
10.0 us on the H200).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from unittest import mock

import pytest
from test_cuda_gemv_persistent import q_linear_spec

from mlcc.backends.cuda import linear, toolchain, tuning
from mlcc.backends.cuda.codegen import compile_library
from mlcc.backends.cuda.intdot import DP2A
from mlcc.errors import MlccError

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


def test_min_blocks_rewrite_the_declaration_and_the_definition():
    code = ('extern "C" __global__ void __launch_bounds__(256) a_kernel(half* x);\n'
            'extern "C" __global__ void __launch_bounds__(128) b_kernel(half* x);\n'
            'extern "C" __global__ void __launch_bounds__(256) a_kernel(half* x) {\n'
            '  a_dev(x);\n}\n'
            'extern "C" __global__ void __launch_bounds__(128) b_kernel(half* x) {\n'
            '  b_dev(x);\n}\n')
    out = toolchain.with_min_blocks(code, {"a_kernel": 2})
    assert out.count("__launch_bounds__(256, 2) a_kernel(") == 2
    assert out.count("__launch_bounds__(128) b_kernel(") == 2
    assert toolchain.with_min_blocks(code, {}) == code
    with pytest.raises(MlccError, match="c_kernel: no __launch_bounds__"):
        toolchain.with_min_blocks(code, {"c_kernel": 3})


def test_database_record_min_blocks_reaches_the_kernel():
    spec = q_linear_spec(1, 4096, 11008)
    record = {"kind": "block", "warps": 8, "rows_per_warp": 2, "dot": DP2A, "min_blocks": 2}
    with mock.patch.object(tuning, "_database", lambda: {"best": {"4096,11008": record}}):
        kernel = linear.gemv_q4_rule(spec, "down")
    assert kernel.min_blocks == 2 and "mlcc_q4_dp2a(" in kernel.device_source
    with mock.patch.object(tuning, "_database", dict):
        assert linear.gemv_q4_rule(spec, "down").min_blocks == 0


@needs_nvcc
def test_library_build_bounds_the_registers(tmp_path, monkeypatch):
    s = linear.LinearShape(q_linear_spec(1, 4096, 11008))
    bounded = linear.gemv_q4_kernel(s, "bounded", 8, 2, dot=DP2A, min_blocks=2)
    free = linear.gemv_q4_kernel(s, "free", 8, 2, dot=DP2A)
    keep = tmp_path / "kept.cu"
    monkeypatch.setenv("MLCC_CUDA_KEEP_SOURCE", str(keep))
    compile_library([bounded, free], "", "", tmp_path / "lib.so")
    source = keep.read_text()
    assert source.count("__launch_bounds__(256, 2) bounded_kernel(") == 2
    assert source.count("__launch_bounds__(256) free_kernel(") == 2
    done = subprocess.run(["nvcc", "--cubin", "-O3", "-std=c++17", "-arch=sm_90", "-w",
                           "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"), str(keep)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    used = {m.group(1): int(m.group(2)) for m in re.finditer(
        r"entry function '(\w+)'.*?Used (\d+) registers", done.stderr, re.DOTALL)}
    assert used["bounded_kernel"] <= 128 < used["free_kernel"], used
