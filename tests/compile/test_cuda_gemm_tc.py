"""The tensor-core prefill GEMM (mlcc.backends.cuda.gemm) without a GPU: rule, source, nvcc.

Which linears the rule takes and which it leaves to the decode GEMVs and the WMMA fallback; the
tile it picks; every benchmark variant built into one library through compile_library; and the
compiled machine code: mma.sync / ldmatrix / cp.async present, no integer->float conversion in
the dequantization, no spills, at most 128 registers for the 128x128 tiles (two blocks of 8
warps per SM). Numbers are checked on the GPU by benchmarks/cuda/gemm_bench.py `run`.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mlcc.backends.cuda.gemm import (
    NARROW_TILE,
    WIDE_TILE,
    TileConfig,
    gemm_tc_kernel,
    gemm_tc_rule,
)
from mlcc.backends.cuda.kernels import C_TYPES, COMMON_SOURCE
from mlcc.backends.cuda.linear import LinearShape
from mlcc.backends.plan import KernelSpec
from mlcc.errors import MlccError
from mlcc.ir.types import Sym

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
ROOT = Path(__file__).resolve().parents[2]
SEQ = Sym("seq_len")


def q4_spec(rows, n: int, k: int, ydt: str = "float16", bias: bool = False, bits: int = 4,
            group: int = 32) -> KernelSpec:
    ins = [((rows, k), "float16"), ((n, k * bits // 32), "uint32"), ((n, k // group), "float16")]
    if bias:
        ins.append(((n,), "float16"))
    return KernelSpec("q_linear", tuple(ins), (((rows, n), ydt),),
                      (("bits", bits), ("group_size", group), ("in_features", k)))


def f16_spec(rows, n: int, k: int, dt: str = "float16") -> KernelSpec:
    return KernelSpec("linear", (((rows, k), dt), ((n, k), dt)), (((rows, n), dt),), ())


def bench_module():
    spec = importlib.util.spec_from_file_location("gemm_bench",
                                                  ROOT / "benchmarks" / "cuda" / "gemm_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rule_takes_prefill_linears_and_declines_the_rest():
    for spec in (q4_spec(SEQ, 12288, 4096), q4_spec(SEQ, 32000, 4096, "float32"),
                 q4_spec(SEQ, 1001, 512, bias=True), q4_spec(64, 4096, 11008),
                 f16_spec(SEQ, 4096, 4096), q4_spec(5, 4096, 4096)):
        kernel = gemm_tc_rule(spec, "k")
        assert kernel is not None and "mma.sync.aligned.m16n8k16" in kernel.device_source
    for spec in (q4_spec(1, 4096, 4096), q4_spec(4, 4096, 4096),  # decode: the GEMVs
                 q4_spec(SEQ, 4096, 4096, bits=3, group=32), q4_spec(SEQ, 4096, 4096, group=64),
                 f16_spec(SEQ, 4096, 4096, "float32"), f16_spec(SEQ, 96, 100)):
        assert gemm_tc_rule(spec, "k") is None
    with pytest.raises(MlccError, match=r"\[compile\] k: the tensor-core GEMM needs"):
        gemm_tc_kernel(LinearShape(f16_spec(SEQ, 96, 100)), "k", WIDE_TILE)


def test_rule_picks_wide_tiles_for_wide_weights_and_grids_rows_fastest():
    wide = gemm_tc_rule(q4_spec(SEQ, 22016, 4096), "k")
    narrow = gemm_tc_rule(q4_spec(SEQ, 4096, 4096), "k")
    assert f"half As[{WIDE_TILE.stages * 128 * 32}]" in wide.device_source
    assert f"n0 = (long long)blockIdx.y * {NARROW_TILE.bn}" in narrow.device_source
    assert "(seq_len + T.int64(127)) // T.int64(128)" in wide.launcher
    assert 'T.thread_binding(T.int64(172), thread="blockIdx.y")' in wide.launcher
    static = gemm_tc_rule(q4_spec(300, 22016, 4096), "k")
    assert 'T.thread_binding(T.int64(3), thread="blockIdx.x")' in static.launcher


def test_tiles_that_do_not_fit_are_refused():
    with pytest.raises(MlccError, match=r"65536 bytes of shared memory > 49152"):
        gemm_tc_kernel(LinearShape(f16_spec(SEQ, 4096, 4096)), "k", TileConfig(128, 128, 2, 4))
    with pytest.raises(MlccError, match=r"warp tiles must be multiples of 16"):
        TileConfig(128, 64, 1, 2).check(q4=True)


def wrapped(kernel, spec: KernelSpec) -> str:
    s = LinearShape(spec)
    params = [f"{'' if b == 'y' else 'const '}{C_TYPES[dt]}* __restrict__ {b}"
              for b, _, dt in s.buffers] + [f"long long {x}" for x in s.symbols]
    args = ", ".join([b for b, _, _ in s.buffers] + s.symbols)
    return (kernel.device_source + f'\nextern "C" __global__ void __launch_bounds__(256) '
            f'{kernel.name}_k({", ".join(params)}) {{ {kernel.name}_dev({args}); }}\n')


def test_machine_code_uses_tensor_cores_async_copies_and_fits_two_blocks_per_sm(tmp_path):
    configs = [TileConfig(128, 128, 2, 4, 2), TileConfig(128, 128, 4, 4, 2),
               TileConfig(128, 64, 4, 4, 2), TileConfig(64, 128, 2, 4, 2),
               TileConfig(128, 128, 2, 3, 3), TileConfig(128, 128, 2, 4, 2, True)]
    source = COMMON_SOURCE
    for i, config in enumerate(configs):
        spec = q4_spec(SEQ, 12288, 4096, bias=i == 1)
        source += wrapped(gemm_tc_kernel(LinearShape(spec), f"q{i}", config), spec)
    spec = f16_spec(SEQ, 4096, 4096)
    source += wrapped(gemm_tc_kernel(LinearShape(spec), "h0", TileConfig(128, 128, 2, 3)), spec)
    (tmp_path / "k.cu").write_text(source)
    flags = ["nvcc", "-O3", "-std=c++17", "-arch=sm_90", str(tmp_path / "k.cu")]
    done = subprocess.run(flags[:1] + ["--cubin", "-Xptxas", "-v", "-o",
                                       str(tmp_path / "k.cubin")] + flags[1:],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    usage = re.findall(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores.*?"
                       r"Used (\d+) registers", done.stderr, re.DOTALL)
    assert len(usage) == 7, done.stderr
    for name, spills, registers in usage:
        assert spills == "0", name
        assert int(registers) <= 128, f"{name}: {registers} registers, two blocks need <= 128"
    subprocess.run(flags[:1] + ["--ptx", "-o", str(tmp_path / "k.ptx")] + flags[1:], check=True)
    ptx = (tmp_path / "k.ptx").read_text()
    for needle in ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
                   "ldmatrix.sync.aligned.m8n8.x4.shared.b16", "cp.async.cg.shared.global",
                   "cp.async.wait_group 2", "ld.global.nc.v2.u32"):
        assert needle in ptx, needle
    assert "cvt.rn.f16.u32" not in ptx and "cvt.rn.f32.u32" not in ptx


@pytest.mark.slow
def test_every_benchmark_variant_builds_into_one_library(tmp_path):
    bench = bench_module()
    bench.build(tmp_path)
    assert (tmp_path / "gemm_bench.so").stat().st_size > 100_000
    names = [v["name"] for v in bench.variants()]
    assert len(names) == len(set(names)) and sum(n.endswith("_wmma") for n in names) == 8
    assert any(n.endswith("_split") for n in names)


def test_wired_ahead_of_wmma_it_takes_every_7b_prefill_linear_and_its_source_compiles(tmp_path, monkeypatch):
    from mlcc.backends.cuda import linear
    from mlcc.backends.cuda.codegen import device_source, library_parts
    from mlcc.interface.compile import load_model_config
    from mlcc.passes import build_pipeline, parse_opt, run_passes
    from mlcc.quant import get_scheme

    rules = list(linear.LINEAR_RULES)
    rules.insert(rules.index(linear.gemm_wmma_rule), gemm_tc_rule)
    monkeypatch.setattr(linear, "LINEAR_RULES", tuple(rules))
    arch, config, quant, _ = load_model_config("llama2_7b", "q4f16_1", None)
    passes = build_pipeline(parse_opt("O2"), get_scheme(quant).model_dtype, quant,
                            config.prefill_chunk_size)
    module = run_passes(arch.build_module(config), passes).module
    built, plans, _, _ = library_parts(module, {"params": []})
    prefill = {c.spec for p in plans if p.name == "prefill" for c in p.calls
               if c.spec.op == "q_linear" and isinstance(c.spec.inputs[0][0][0], Sym)}
    by_spec = {k.name: k for k in built}
    assert len(prefill) == 4  # qkv, o_proj, gate_up, down (lm_head sees the last row only)
    tc = [k for k in built if "mlcc_tc_mma16816(acc" in k.device_source]
    assert len(tc) == len(prefill) and "wmma::" not in device_source(list(by_spec.values()))
    (tmp_path / "k.cu").write_text(device_source(built))
    done = subprocess.run(["nvcc", "--cubin", "-O3", "-std=c++17", "-arch=sm_90", "-o",
                           str(tmp_path / "k.cubin"), str(tmp_path / "k.cu")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_bench_reference_dequantizes_like_the_interpreter():
    import numpy as np
    import torch

    from mlcc.ir.quant_ops import dequantize_group

    bench = bench_module()
    rng = np.random.default_rng(3)
    v = {"n": 48, "k": 256, "weights": "q4", "bias": False}
    qw, qs = bench.case_data(rng, v, 1)[0]["arrays"]
    got = bench.dequantized(torch, [qw, qs], "q4", device="cpu").numpy()
    # q_linear's reference dequantizes in float32, then rounds to the scale dtype
    expected = dequantize_group(qw, qs, 4, 32, 256).astype(np.float16).astype(np.float32)
    assert np.array_equal(got, expected)


def test_bench_times_only_kernels_that_match_the_reference(monkeypatch):
    import numpy as np
    import torch

    bench = bench_module()
    monkeypatch.setattr(bench, "time_variant", lambda *args: 10.0)
    rng = np.random.default_rng(4)
    v = {"case": "c", "tile": "t", "name": "c_t", "n": 64, "k": 128, "weights": "q4",
         "y": "float16", "bias": True}
    data = bench.case_data(rng, v, 1)
    qw, qs, bias = data[0]["arrays"]
    data[0]["dev"] = data[0]["arrays"]
    x = rng.standard_normal((5, 128)).astype(np.float16)
    w = bench.dequantized(torch, [qw, qs], "q4", device="cpu")
    expected = torch.from_numpy(x).float() @ w.T + torch.from_numpy(bias).float()

    class Out:  # stands in for the runtime tensor the kernel writes
        value = np.zeros((5, 64), np.float16)

        def numpy(self):
            return self.value

    y = Out()

    def kernel(x_dev, qw_dev, qs_dev, b_dev, y_dev):
        y_dev.value = expected.numpy().astype(np.float16)

    good = bench.measure(torch, kernel, v, 5, x, y, data, expected)
    assert good["rel_err"] < 1e-3 and good["us"] == 10.0
    assert good["tflops"] == pytest.approx(2 * 5 * 64 * 128 / 10e-6 / 1e12)
    wrong = bench.measure(torch, lambda *a: setattr(y, "value", y.value[:, ::-1].copy()), v, 5,
                          x, y, data, expected)
    assert wrong["rel_err"] > 5e-3 and "us" not in wrong
    best = bench.best_tiles([dict(good, tile="wmma", tflops=1.0), good, wrong])
    assert best == {"c,M=5": {"wmma_tflops": 1.0, "tile": "t", "us": 10.0,
                              "tflops": good["tflops"]}}
