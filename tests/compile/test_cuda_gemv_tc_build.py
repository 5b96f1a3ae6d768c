"""nvcc compiles the tensor-core GEMV for every Llama-2-7B decode shape without spilling.

The configs are those benchmarks/cuda/gemv_sweep.py measures at 1, 4 and 16 rows (16 also for
the batch symbol) plus the rule's defaults. Each kernel is wrapped in a __global__ function
bounded by the launch's thread count (as TVM's launchers are) and compiled for sm_90 with
ptxas' resource report: no spill stores or loads, fewer than 128 registers a thread (so two
256-thread blocks fit an SM), static shared memory within 48 KB.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mlcc.backends.cuda.gemv_tc import TcConfig, fits, gemv_q4_tc_kernel, tc_config
from mlcc.backends.cuda.kernels import COMMON_SOURCE
from mlcc.backends.cuda.linear import LinearShape
from mlcc.backends.plan import KernelSpec
from mlcc.ir.types import Sym

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")

SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)]


def sweep_configs() -> dict:
    """rows -> the TcConfigs the GEMV sweep builds at that row count (tc_config's default is
    added to each)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "cuda" / "gemv_sweep.py"
    spec = importlib.util.spec_from_file_location("gemv_sweep_tc_configs", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    return {1: [TcConfig(*c) for c in sweep.TC_FEW_ROWS],
            4: [TcConfig(*c) for c in sweep.TC_FOUR_ROWS], 8: [],  # 8: the default only
            16: [TcConfig(*c) for c in sweep.TC_MANY_ROWS],
            Sym("batch"): [TcConfig(*c) for c in sweep.TC_BATCH]}


def spec_for(n: int, k: int, rows) -> KernelSpec:
    ydt = "float32" if n == 32000 else "float16"
    return KernelSpec("q_linear", (((rows, k), "float16"), ((n, k // 8), "uint32"),
                                   ((n, k // 32), "float16")), (((rows, n), ydt),),
                      (("bits", 4), ("group_size", 32), ("in_features", k)))


def global_wrapper(s: LinearShape, name: str, threads: int) -> str:
    """The __global__ function TVM's CUDA codegen writes around `name`_dev: parameters sorted
    by name, `_ptr` pointers without const, symbols as int64_t, the thread bound."""
    types = {"float16": "half", "float32": "float", "uint32": "uint"}
    params = ", ".join([f"{types[dt]}* __restrict__ {b}_ptr" for b, _, dt in
                        sorted(s.buffers)] + [f"int64_t {x}" for x in s.symbols])
    args = ", ".join([f"{b}_ptr" for b, _, _ in s.buffers] + s.symbols)
    return (f'\nextern "C" __global__ void __launch_bounds__({threads}) {name}_g({params}) '
            f"{{\n  {name}_dev({args});\n}}\n")


def wrapped(s: LinearShape, name: str, config: TcConfig) -> str:
    kernel = gemv_q4_tc_kernel(s, name, config)
    return kernel.device_source + global_wrapper(s, name, 32 * config.warps)


def resources(source: str, tmp_path) -> dict[str, tuple[int, int, int, int]]:
    """ptxas' report per kernel: (registers, spill stores, spill loads, shared bytes)."""
    (tmp_path / "k.cu").write_text(source)
    done = subprocess.run([shutil.which("nvcc"), "--cubin", "-arch=sm_90", "-O3", "-std=c++17",
                           "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"),
                           str(tmp_path / "k.cu")], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out, name = {}, None
    for line in done.stderr.splitlines():
        found = re.search(r"Compiling entry function '(\w+)'", line)
        name = found.group(1) if found else name
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spill:
            stores, loads = int(spill.group(1)), int(spill.group(2))
        used = re.search(r"Used (\d+) registers.*?(\d+) bytes smem", line)
        if used:
            out[name] = (int(used.group(1)), stores, loads, int(used.group(2)))
    return out


@pytest.mark.slow
def test_every_7b_decode_shape_compiles_without_spills_under_128_registers(tmp_path):
    parts, names = ["#include <cstdint>\ntypedef unsigned int uint;", COMMON_SOURCE], []
    for n, k in SHAPES:
        for rows, configs in sweep_configs().items():
            s = LinearShape(spec_for(n, k, rows))
            for config in dict.fromkeys(configs + [tc_config(s)]):
                assert fits(s, config), (n, k, rows, config)
                name = f"tc_{n}_{k}_{rows}_{config.tag}"
                names.append(name)
                parts.append(wrapped(s, name, config))
    report = resources("\n".join(parts), tmp_path)
    assert sorted(report) == sorted(f"{n}_g" for n in names)
    bad = []
    for name, (regs, stores, loads, smem) in sorted(report.items()):
        print(f"{name:44s} {regs:4d} registers {stores:3d} B spilled {smem:6d} B shared")
        if stores or loads or regs >= 128 or smem > 48 * 1024:
            bad.append(name)
    assert not bad
