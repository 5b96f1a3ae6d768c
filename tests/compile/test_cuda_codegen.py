"""CUDA codegen without a GPU: rule choice, generated source through nvcc, a full library build.

The device code is checked where it can be here: every kernel of several models compiles with
nvcc for sm_90; the decode GEMV's PTX streams weights with 128-bit non-coherent loads and spills
nothing; a built library holds compiled device code (no CUDA source left to compile at load
time) and its metadata reads back on the CPU. Numbers are checked on the GPU (tests/gpu).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mlcc.backends.cuda import linear
from mlcc.backends.cuda.codegen import device_source, kernel_for, library_parts
from mlcc.backends.plan import KernelSpec
from mlcc.errors import MlccError
from mlcc.interface.compile import load_model_config, resolve_device
from mlcc.ir.types import Sym
from mlcc.passes import build_pipeline, parse_opt, run_passes
from mlcc.quant import get_scheme

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
STORIES = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260K"
PRELUDE = "#include <cuda_fp16.h>\n#include <cstdint>\n"


def lowered(model, quantization: str, opt: str = "O2"):
    arch, config, quant, _ = load_model_config(model, quantization, None)
    module = arch.build_module(config)
    passes = build_pipeline(parse_opt(opt), get_scheme(quant).model_dtype, quant,
                            config.prefill_chunk_size)
    return run_passes(module, passes).module


def q_linear_spec(rows, n: int, k: int, bits: int = 4, group: int = 32) -> KernelSpec:
    per_word = 32 // bits
    words, groups = -(-(-(-k // group) * group) // per_word), -(-k // group)
    return KernelSpec("q_linear", (((rows, k), "float16"), ((n, words), "uint32"),
                                   ((n, groups), "float16")), (((rows, n), "float16"),),
                      (("bits", bits), ("group_size", group), ("in_features", k)))


def nvcc(source: str, tmp_path: Path, fmt: str = "cubin") -> subprocess.CompletedProcess:
    src = tmp_path / "k.cu"
    src.write_text(PRELUDE + source)
    return subprocess.run(["nvcc", f"--{fmt}", "-O3", "-std=c++17", "-arch=sm_90",
                           "-Xptxas", "-v", "-o", str(tmp_path / f"k.{fmt}"), str(src)],
                          capture_output=True, text=True, check=False)


def test_rules_pick_gemv_for_decode_and_tensor_cores_for_prefill():
    decode = q_linear_spec(1, 22016, 4096)
    assert linear.gemv_q4_rule(decode, "k") is not None
    prefill = q_linear_spec(Sym("seq_len"), 22016, 4096)
    assert linear.gemv_q4_rule(prefill, "k") is None and linear.gemv_rule(prefill, "k") is None
    assert "mma.sync.aligned.m16n8k16" in linear.gen_linear(prefill, "k").device_source
    # specs the tensor-core GEMM declines (K not a multiple of 32) keep the WMMA kernel
    odd_k = KernelSpec("linear", (((Sym("seq_len"), 48), "float16"), ((96, 48), "float16")),
                       (((Sym("seq_len"), 96), "float16"),), ())
    assert "wmma::mma_sync" in linear.gen_linear(odd_k, "k").device_source
    # batch_decode (one row per sequence): the tensor-core GEMV, as the shipped database says
    batch = q_linear_spec(Sym("batch"), 22016, 4096)
    assert "mlcc_tcv_mma(" in linear.gen_linear(batch, "k").device_source
    assert "mlcc_tcv_mma(" not in linear.gen_linear(decode, "k").device_source
    q3 = q_linear_spec(1, 4096, 4096, bits=3, group=40)
    assert linear.gemv_q4_rule(q3, "k") is None
    assert "__shfl_xor_sync" in device_source([linear.gen_linear(q3, "k")])
    fp32 = KernelSpec("linear", (((Sym("seq_len"), 64), "float32"), ((96, 64), "float32")),
                      (((Sym("seq_len"), 96), "float32"),), ())
    assert linear.gemm_wmma_rule(fp32, "k") is None
    assert "As[16][17]" in linear.gen_linear(fp32, "k").device_source


@pytest.mark.parametrize("model,quantization", [
    (STORIES, "q0f32"), (STORIES, "q4f16_1"), (STORIES, "q3f16_1"), ("llama2_7b", "q4f16_1"),
    ("llama2_7b", "q0f16")])
def test_every_kernel_compiles_with_nvcc(tmp_path, model, quantization):
    built, plans, entries, _ = library_parts(lowered(model, quantization), {"params": []})
    ops = {k.name.split("_", 1)[1] for k in built}
    assert {"rms_norm", "qkv_attention", "silu_mul", "last_logits"} <= ops
    assert {p.name for p in plans} == {"prefill", "decode"}
    assert entries.count("T.call_cpacked") == sum(len(p.calls) for p in plans)
    done = nvcc(device_source(built), tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


def test_decode_gemv_uses_128_bit_weight_loads_and_no_spills(tmp_path):
    kernel = kernel_for(q_linear_spec(1, 11008 * 2, 4096), "k0_q_linear")
    wrapper = ('extern "C" __global__ void __launch_bounds__(256) gemv(half* x, unsigned int* '
               'qw, half* qs, half* y) { k0_q_linear_dev(x, qw, qs, y); }\n')
    done = nvcc(device_source([kernel]) + wrapper, tmp_path, "ptx")
    assert done.returncode == 0, done.stderr[-2000:]
    ptx = (tmp_path / "k.ptx").read_text()
    assert re.search(r"ld\.global\.nc\.v4\.u32", ptx), "weights must stream as 128-bit loads"
    assert "cvt.rn.f32.u32" not in ptx and "cvt.rn.f16.u32" not in ptx, \
        "nibbles must become half2 by bit tricks, not integer conversions"
    done = nvcc(device_source([kernel]) + wrapper, tmp_path, "cubin")
    assert " 0 bytes spill stores" in done.stderr, done.stderr


def test_resolve_device_accepts_cuda_spellings():
    assert resolve_device("cuda") == "cuda"
    assert resolve_device("cuda:1") == "cuda"
    assert resolve_device("cuda-sm_90,sm_80") == "cuda-sm_90,sm_80"
    assert resolve_device("cpu") == "llvm"
    assert resolve_device("auto") in ("cuda", "llvm")
    with pytest.raises(MlccError, match=r"\[compile\] --device cuda:x"):
        resolve_device("cuda:x")


@pytest.mark.slow
def test_built_library_holds_compiled_code_and_metadata(tmp_path):
    import tvm

    from mlcc.interface.compile import compile_model
    from mlcc.runtime_check.compiled import read_metadata

    out = tmp_path / "lib.so"
    compile_model(STORIES, out, quantization="q4f16_1", device="cuda")
    data = out.read_bytes()
    assert b"__global__" not in data, "device code must be compiled at build time"
    meta = read_metadata(tvm.runtime.load_module(str(out)))
    assert meta["device"] == "cuda" and meta["quantization"] == "q4f16_1"
    specs = meta["kernel_specs"]
    assert {s["op"] for s in specs.values()} >= {"q_linear", "q_embedding", "qkv_attention"}
    assert set(meta["entries"]) == {"prefill", "decode"}
    with pytest.raises(MlccError, match=r"\[compile\] -o .*lib\.tar: the CUDA backend writes"):
        compile_model(STORIES, tmp_path / "lib.tar", quantization="q4f16_1", device="cuda")


def test_decode_folds_norms_and_silu_mul_into_the_gemv():
    from mlcc.backends.cuda.fusion import fuse_prologues
    from mlcc.backends.plan import plan_entry, writes_over_inputs

    module = lowered("llama2_7b", "q4f16_1")
    decode = next(fn for fn in module.functions if fn.name == "decode")
    plan = plan_entry(decode, module)
    fused = fuse_prologues(plan)
    ops = [c.spec.op for c in fused.calls]
    # per layer: norm+qkv, attention, o_proj, add_norm+gate_up, silu_mul+down; then the head
    assert ops.count("norm_q_linear") == 65  # two per layer and the final norm before lm_head
    assert ops.count("silu_mul_q_linear") == 32
    assert "rms_norm" not in ops and "add_rms_norm" not in ops and "silu_mul" not in ops
    assert len(fused.calls) == len(plan.calls) - 97
    # planned for it (mlcc.passes.layout.FUSABLE_PAIRS): no fused GEMV writes over its inputs
    assert not any(writes_over_inputs(c, dict(plan.bounds)) for c in fused.calls)
    # the residual sum keeps flowing: every add_rms_norm output s is still produced
    produced = {b for c in fused.calls for b in c.buffers[len(c.spec.inputs):]}
    needed = {b for c in fused.calls for b in c.buffers[:len(c.spec.inputs)]
              if b.source == "workspace"}
    assert needed <= produced
    prefill = next(fn for fn in module.functions if fn.name == "prefill")
    assert len(fuse_prologues(plan_entry(prefill, module)).calls) == len(
        plan_entry(prefill, module).calls), "prefill GEMMs take no prologue"
